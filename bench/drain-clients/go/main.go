// One closed loop of `make drain-clients` for Go: net/http's default client over HTTP/1.1
// keep-alive, or golang.org/x/net/http2's Transport over h2c (prior knowledge, the usual
// AllowHTTP + plain-TCP DialTLS recipe). Built with Debian's golang-go and
// golang-golang-x-net-dev (GOPATH mode, no module download).
//
//	drain-client -proto h1|h2c -url URL -concurrency N
//
// GET requests back to back until stdin closes. Prints READY once a request succeeded, then
// one JSON line: versions and one record per request
// [start unix ms, duration ms, status (0 on a transport error), error, retry-after].
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

func main() {
	proto := flag.String("proto", "h1", "h1 or h2c")
	url := flag.String("url", "", "target URL")
	concurrency := flag.Int("concurrency", 4, "loops")
	flag.Parse()

	var client *http.Client
	switch *proto {
	case "h1":
		client = &http.Client{Timeout: 10 * time.Second}
	case "h2c":
		client = &http.Client{Timeout: 10 * time.Second, Transport: &http2.Transport{
			AllowHTTP: true,
			DialTLS: func(network, addr string, _ *tls.Config) (net.Conn, error) {
				return net.Dial(network, addr)
			},
		}}
	default:
		fmt.Fprintln(os.Stderr, "-proto h1|h2c")
		os.Exit(2)
	}
	once := func() (int, string, error) {
		r, err := client.Get(*url)
		if err != nil {
			return 0, "", err
		}
		defer r.Body.Close()
		if _, err := io.Copy(io.Discard, r.Body); err != nil {
			return 0, "", err
		}
		return r.StatusCode, r.Header.Get("retry-after"), nil
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if s, _, err := once(); err == nil && s < 300 {
			break
		}
		if time.Now().After(deadline) {
			fmt.Fprintln(os.Stderr, "no 2xx from", *url)
			os.Exit(1)
		}
		time.Sleep(50 * time.Millisecond)
	}
	fmt.Println("READY")

	var stopped atomic.Bool
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		stopped.Store(true)
	}()
	var mu sync.Mutex
	records := [][]any{}
	var wg sync.WaitGroup
	for i := 0; i < *concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stopped.Load() {
				start := time.Now()
				t := float64(start.UnixNano()) / 1e6
				s, ra, err := once()
				d := float64(time.Since(start).Nanoseconds()) / 1e6
				var rec []any
				if err != nil {
					msg := err.Error()
					if len(msg) > 160 {
						msg = msg[:160]
					}
					rec = []any{t, d, 0, msg, nil}
				} else {
					var raV any
					if ra != "" {
						raV = ra
					}
					rec = []any{t, d, s, "", raV}
				}
				mu.Lock()
				records = append(records, rec)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	out, _ := json.Marshal(map[string]any{
		"versions": map[string]string{"go": runtime.Version(), "x/net": "Debian golang-golang-x-net-dev"},
		"records":  records,
	})
	fmt.Println(string(out))
}
