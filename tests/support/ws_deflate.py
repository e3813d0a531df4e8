"""WebSocket peers with permessage-deflate (RFC 7692), from the `websockets` package.

    ws_deflate.py serve PORT   an echo server on 127.0.0.1:PORT; prints `LISTENING addr`
    ws_deflate.py client URL   sends messages of several sizes, text and binary, whole and
                               fragmented, and checks each comes back unchanged; exits 0 when
                               all did, printing the negotiated extensions
"""
import asyncio
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def server(port):
    # compression="deflate" is the default; said here because it is the point.
    async with serve(echo, "127.0.0.1", port, compression="deflate", max_size=None):
        print(f"LISTENING 127.0.0.1:{port}", flush=True)
        await asyncio.Future()


async def client(url):
    async with connect(url, compression="deflate", max_size=None) as ws:
        names = [e.name for e in ws.protocol.extensions]
        print("extensions:", " ".join(names), flush=True)
        if "permessage-deflate" not in names:
            sys.exit("permessage-deflate was not negotiated")
        for size in (0, 125, 126, 64 * 1024, 1024 * 1024):
            text = "".join(chr(97 + i % 26) for i in range(size))
            binary = bytes(i * 7 % 251 for i in range(size))
            for message in (text, binary):
                await ws.send(message)
                back = await ws.recv()
                if back != message:
                    sys.exit(f"{size} bytes ({type(message).__name__}) came back changed")
            # The same message in three fragments (an iterable is sent fragmented).
            parts = [text[: size // 3], text[size // 3 : 2 * size // 3], text[2 * size // 3 :]]
            await ws.send(parts)
            back = await ws.recv()
            if back != text:
                sys.exit(f"{size} bytes in fragments came back changed")
        print("all messages came back unchanged", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(server(int(sys.argv[2])))
    else:
        asyncio.run(client(sys.argv[2]))
