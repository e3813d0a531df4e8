//! The e2e harness's own checks that need no Envoy: a metric Envoy does not report fails the
//! test that reads it, and the ports the harness hands out never repeat.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use support::Stats;

const TEXT: &str = "\
# TYPE handoff_canary_decisions counter
handoff_canary_decisions{variant=\"canary\",reason=\"hash\"} 3
handoff_canary_decisions{reason=\"anonymous\",variant=\"stable\"} 2
handoff_canary_decisions{variant=\"canary\",reason=\"anonymous\"} 1
handoff_drain_state{} 1
";

#[test]
fn reported_metrics_are_read_whatever_the_label_order() {
    let s = Stats::parse(TEXT);
    assert_eq!(s.decisions("canary", "hash"), 3.0);
    assert_eq!(s.get("handoff_drain_state", &[]), 1.0);
    assert_eq!(s.sum("handoff_canary_decisions"), 6.0);
    assert_eq!(
        s.sum_with("handoff_canary_decisions", &[("reason", "anonymous")]),
        3.0
    );
}

#[test]
#[should_panic(
    expected = "no metric handoff_canary_decisions{reason=\"override\",variant=\"canary\"}"
)]
fn a_series_envoy_does_not_report_fails_the_test() {
    Stats::parse(TEXT).decisions("canary", "override");
}

#[test]
#[should_panic(expected = "no metric handoff_canary_decision ")]
fn a_renamed_metric_fails_sum() {
    Stats::parse(TEXT).sum("handoff_canary_decision");
}

#[test]
fn absent_series_read_as_zero_only_when_asked() {
    let s = Stats::parse(TEXT);
    assert_eq!(
        s.get_or_zero("handoff_translate_translations", &[("route", "r")]),
        0.0
    );
    assert_eq!(s.sum_or_zero("handoff_translate_translations"), 0.0);
}

#[test]
fn free_ports_never_repeat_in_one_process() {
    let ports: Vec<u16> = (0..500).map(|_| support::free_port()).collect();
    let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len());
}
