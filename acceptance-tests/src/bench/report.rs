//! The figures of the side-by-side benchmark, their samples over rounds, medians, and the
//! Markdown report: one table with both stacks and the ratio per figure, then issue 8's
//! targets checked against the measured ratios. Pure, so the report's arithmetic and layout
//! are unit tested.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The two stacks measured side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stack {
    /// HAProxy (TCP, SNI) → boringtun-cli → Caddy (`tls internal`) → the origin.
    Anchor,
    /// `edgible-edge` → Edgible's WireGuard → `edgible-agent`'s proxy → the origin.
    Edgible,
}

impl Stack {
    pub const BOTH: [Stack; 2] = [Stack::Anchor, Stack::Edgible];

    pub fn name(self) -> &'static str {
        match self {
            Stack::Anchor => "anchor (HAProxy → boringtun → Caddy)",
            Stack::Edgible => "Edgible (edge → WireGuard → agent)",
        }
    }

    /// The order of round `round` (from 0): the stacks alternate which goes first, so a drift
    /// in machine load hits both alike.
    pub fn order(round: u32) -> [Stack; 2] {
        if round.is_multiple_of(2) { [Stack::Anchor, Stack::Edgible] } else { [Stack::Edgible, Stack::Anchor] }
    }
}

/// One measured figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Figure {
    /// Single-stream TCP throughput through the tunnel (iperf3), Gb/s.
    TunnelGbps,
    /// CPU time of both tunnel ends per gigabit moved during the iperf3 run: CPU cores busy
    /// per Gb/s.
    TunnelCpuPerGbps,
    /// HTTPS requests/s over HTTP/1.1 with keep-alive.
    KeepAliveRps,
    /// Median latency of the keep-alive run, ms.
    KeepAliveP50Ms,
    /// 99th percentile latency of the keep-alive run, ms.
    KeepAliveP99Ms,
    /// New TLS connections/s: one request per connection.
    NewTlsPerSecond,
    /// HTTPS requests/s over HTTP/2.
    Http2Rps,
    /// Seconds to download 1 GiB.
    DownloadSeconds,
    /// RSS of the edge side (its processes) with the idle connections open, MiB.
    EdgeRssMib,
    /// RSS of the device side with the idle connections open, MiB.
    AgentRssMib,
    /// The edge side's RSS growth per idle proxied connection, KiB.
    EdgeKibPerConnection,
}

impl Figure {
    pub const ALL: [Figure; 11] = [
        Figure::TunnelGbps,
        Figure::TunnelCpuPerGbps,
        Figure::KeepAliveRps,
        Figure::KeepAliveP50Ms,
        Figure::KeepAliveP99Ms,
        Figure::NewTlsPerSecond,
        Figure::Http2Rps,
        Figure::DownloadSeconds,
        Figure::EdgeRssMib,
        Figure::AgentRssMib,
        Figure::EdgeKibPerConnection,
    ];

    /// The row's label, with its unit.
    pub fn label(self, settings: &Settings) -> String {
        let idle = thousands(u64::from(settings.idle_connections));
        match self {
            Figure::TunnelGbps => "tunnel throughput, 1 TCP stream (Gb/s)".to_owned(),
            Figure::TunnelCpuPerGbps => "tunnel CPU per Gb/s (cores, both ends)".to_owned(),
            Figure::KeepAliveRps => {
                format!("HTTPS keep-alive, {} connections (req/s)", settings.connections)
            }
            Figure::KeepAliveP50Ms => "keep-alive latency p50 (ms)".to_owned(),
            Figure::KeepAliveP99Ms => "keep-alive latency p99 (ms)".to_owned(),
            Figure::NewTlsPerSecond => {
                format!("new TLS connections, {} at once (conn/s)", settings.connections)
            }
            Figure::Http2Rps => {
                format!("HTTP/2, {} connections × {} streams (req/s)", settings.connections, settings.http2_streams)
            }
            Figure::DownloadSeconds => "1 GiB download (s)".to_owned(),
            Figure::EdgeRssMib => format!("edge RSS, {idle} idle connections (MiB)"),
            Figure::AgentRssMib => format!("agent RSS, {idle} idle connections (MiB)"),
            Figure::EdgeKibPerConnection => "edge memory per proxied connection (KiB)".to_owned(),
        }
    }

    pub fn higher_is_better(self) -> bool {
        matches!(self, Figure::TunnelGbps | Figure::KeepAliveRps | Figure::NewTlsPerSecond | Figure::Http2Rps)
    }
}

/// How the run was made, for the labels and the heading.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// When the run started (UTC, as printed).
    pub date: String,
    /// The machine: CPU model, cores, memory, kernel.
    pub machine: String,
    pub rounds: u32,
    /// Seconds of each timed run.
    pub seconds: u32,
    /// Concurrent connections of the request-rate runs.
    pub connections: u32,
    /// Concurrent streams per HTTP/2 connection.
    pub http2_streams: u32,
    /// Idle connections asked for in the memory runs.
    pub idle_connections: u32,
}

/// Every sample, by figure and stack, in the order measured.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    values: BTreeMap<(Figure, Stack), Vec<f64>>,
    /// Measurements that failed: what, and why.
    failures: Vec<String>,
    /// What else the run saw that a reader of the figures should know (errors a tool counted).
    notes: Vec<String>,
}

impl Samples {
    /// Records one sample; a value that is not finite (a division by zero) is dropped.
    pub fn record(&mut self, figure: Figure, stack: Stack, value: f64) {
        if value.is_finite() {
            self.values.entry((figure, stack)).or_default().push(value);
        }
    }

    /// Records that a measurement failed, so the report says so instead of hiding a gap.
    pub fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    pub fn failures(&self) -> &[String] {
        &self.failures
    }

    /// Records a remark about a measurement that still counts.
    pub fn note(&mut self, what: String) {
        self.notes.push(what);
    }

    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    pub fn values(&self, figure: Figure, stack: Stack) -> &[f64] {
        self.values.get(&(figure, stack)).map_or(&[], Vec::as_slice)
    }

    pub fn median(&self, figure: Figure, stack: Stack) -> Option<f64> {
        median(self.values(figure, stack))
    }

    /// Edgible's median over the anchor's.
    pub fn ratio(&self, figure: Figure) -> Option<f64> {
        let (anchor, edgible) = (self.median(figure, Stack::Anchor)?, self.median(figure, Stack::Edgible)?);
        (anchor != 0.0).then(|| edgible / anchor)
    }
}

/// The median: the middle value, or the mean of the two middle ones.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|value| value.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) { (sorted[middle - 1] + sorted[middle]) / 2.0 } else { sorted[middle] })
}

/// A number with as many decimals as its size deserves: 3 significant digits for small ones,
/// none from 100 on (with thousands separators).
pub fn format_value(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 {
        let rounded = value.round();
        let sign = if rounded < 0.0 { "-" } else { "" };
        format!("{sign}{}", thousands(rounded.abs() as u64))
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// `12345` → `12,345`.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut text = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

/// A table cell: the median, and the range when there is more than one sample.
fn cell(values: &[f64]) -> String {
    let Some(middle) = median(values) else { return "—".to_owned() };
    let finite = values.iter().copied().filter(|value| value.is_finite());
    let (low, high) =
        finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), value| (low.min(value), high.max(value)));
    if values.len() > 1 {
        format!("{} ({}–{})", format_value(middle), format_value(low), format_value(high))
    } else {
        format_value(middle)
    }
}

/// Which stack did better on a figure, by its median.
fn better(samples: &Samples, figure: Figure) -> &'static str {
    let Some(ratio) = samples.ratio(figure) else { return "" };
    let edgible_better = if figure.higher_is_better() { ratio > 1.0 } else { ratio < 1.0 };
    if ratio == 1.0 {
        "equal"
    } else if edgible_better {
        "Edgible"
    } else {
        "anchor"
    }
}

/// The Markdown table: figure, each stack's median (and range), Edgible ÷ anchor, and who is
/// better.
pub fn table(samples: &Samples, settings: &Settings) -> String {
    let mut text = String::new();
    let _ =
        writeln!(text, "| figure | {} | {} | Edgible ÷ anchor | better |", Stack::Anchor.name(), Stack::Edgible.name());
    text.push_str("|---|---:|---:|---:|---|\n");
    for figure in Figure::ALL {
        let ratio = samples.ratio(figure).map_or_else(|| "—".to_owned(), |ratio| format!("{ratio:.2}×"));
        let _ = writeln!(
            text,
            "| {} | {} | {} | {ratio} | {} |",
            figure.label(settings),
            cell(samples.values(figure, Stack::Anchor)),
            cell(samples.values(figure, Stack::Edgible)),
            better(samples, figure),
        );
    }
    text
}

/// One of issue 8's targets and how the run measured up.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetCheck {
    pub target: &'static str,
    /// What was measured, in words.
    pub measured: String,
    /// `None` when a figure it needs is missing.
    pub met: Option<bool>,
}

/// The most edge memory a proxied connection may take, KiB (issue 8).
pub const EDGE_KIB_PER_CONNECTION_TARGET: f64 = 32.0;

/// Issue 8's targets, checked against the medians.
pub fn targets(samples: &Samples) -> Vec<TargetCheck> {
    let ratio_check = |target: &'static str, figure: Figure, at_least: f64| {
        let ratio = samples.ratio(figure);
        TargetCheck {
            target,
            measured: ratio.map_or_else(|| "not measured".to_owned(), |ratio| format!("{ratio:.2}×")),
            met: ratio.map(|ratio| ratio >= at_least),
        }
    };
    let requests = samples.ratio(Figure::KeepAliveRps);
    let p99 = samples.ratio(Figure::KeepAliveP99Ms);
    let memory = samples.median(Figure::EdgeKibPerConnection, Stack::Edgible);
    vec![
        ratio_check("tunnel throughput ≥ 3× boringtun-cli", Figure::TunnelGbps, 3.0),
        TargetCheck {
            target: "full-path requests/s ≥ 1.5× the anchor at equal or lower p99",
            measured: match (requests, p99) {
                (Some(requests), Some(p99)) => format!("{requests:.2}× the requests/s at {p99:.2}× the p99"),
                _ => "not measured".to_owned(),
            },
            met: requests.zip(p99).map(|(requests, p99)| requests >= 1.5 && p99 <= 1.0),
        },
        ratio_check("new TLS connections/s ≥ 2×", Figure::NewTlsPerSecond, 2.0),
        TargetCheck {
            target: "edge memory per proxied connection ≤ 32 KiB",
            measured: memory.map_or_else(|| "not measured".to_owned(), |kib| format!("{} KiB", format_value(kib))),
            met: memory.map(|kib| kib <= EDGE_KIB_PER_CONNECTION_TARGET),
        },
    ]
}

/// The whole report: heading, settings, the table, the targets and any failed measurement.
pub fn render(samples: &Samples, settings: &Settings) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "# Edgible vs. HAProxy → boringtun → Caddy\n");
    let _ = writeln!(text, "- date: {}", settings.date);
    let _ = writeln!(text, "- machine: {}", settings.machine);
    let _ = writeln!(
        text,
        "- rounds: {}, the stacks alternating run by run; {} s per timed run; medians (min–max)\n",
        settings.rounds, settings.seconds
    );
    text.push_str(&table(samples, settings));
    text.push_str("\nTargets (issue 8):\n\n");
    for check in targets(samples) {
        let verdict = match check.met {
            Some(true) => "met",
            Some(false) => "not met",
            None => "not measured",
        };
        let _ = writeln!(text, "- {}: {} — {verdict}", check.target, check.measured);
    }
    if !samples.failures().is_empty() {
        text.push_str("\nFailed measurements (missing from the medians):\n\n");
        for failure in samples.failures() {
            let _ = writeln!(text, "- {failure}");
        }
    }
    if !samples.notes().is_empty() {
        text.push_str("\nNotes:\n\n");
        for note in samples.notes() {
            let _ = writeln!(text, "- {note}");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            date: "2026-11-25 07:00 UTC".to_owned(),
            machine: "2 × Test CPU, 23 GiB, Linux 6.1".to_owned(),
            rounds: 3,
            seconds: 5,
            connections: 50,
            http2_streams: 10,
            idle_connections: 9_900,
        }
    }

    #[test]
    fn medians_take_the_middle_or_the_mean_of_the_two_middles() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 2.0]), Some(2.0));
    }

    #[test]
    fn rounds_alternate_which_stack_goes_first() {
        assert_eq!(Stack::order(0), [Stack::Anchor, Stack::Edgible]);
        assert_eq!(Stack::order(1), [Stack::Edgible, Stack::Anchor]);
        assert_eq!(Stack::order(2), Stack::order(0));
    }

    #[test]
    fn values_are_formatted_by_size() {
        assert_eq!(format_value(12_345.6), "12,346");
        assert_eq!(format_value(123.4), "123");
        assert_eq!(format_value(12.34), "12.3");
        assert_eq!(format_value(1.234), "1.23");
        assert_eq!(format_value(0.6789), "0.679");
        assert_eq!(format_value(-1500.0), "-1,500");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }

    #[test]
    fn samples_give_ratios_of_medians_and_drop_non_finite_values() {
        let mut samples = Samples::default();
        for value in [0.6, 0.7, 0.8] {
            samples.record(Figure::TunnelGbps, Stack::Anchor, value);
        }
        for value in [2.0, 1.0, 3.0] {
            samples.record(Figure::TunnelGbps, Stack::Edgible, value);
        }
        samples.record(Figure::TunnelGbps, Stack::Edgible, f64::INFINITY);
        assert_eq!(samples.values(Figure::TunnelGbps, Stack::Edgible).len(), 3);
        let ratio = samples.ratio(Figure::TunnelGbps).expect("both measured");
        assert!((ratio - 2.0 / 0.7).abs() < 1e-12);
        assert_eq!(samples.ratio(Figure::Http2Rps), None);
        samples.record(Figure::Http2Rps, Stack::Anchor, 0.0);
        samples.record(Figure::Http2Rps, Stack::Edgible, 5.0);
        assert_eq!(samples.ratio(Figure::Http2Rps), None, "no ratio over zero");
    }

    #[test]
    fn the_table_has_a_row_per_figure_with_medians_ranges_ratios_and_the_winner() {
        let mut samples = Samples::default();
        for (anchor, edgible) in [(0.61, 1.9), (0.75, 2.1), (0.68, 2.0)] {
            samples.record(Figure::TunnelGbps, Stack::Anchor, anchor);
            samples.record(Figure::TunnelGbps, Stack::Edgible, edgible);
        }
        for (anchor, edgible) in [(30.0, 20.0), (39.0, 25.0), (35.0, 22.0)] {
            samples.record(Figure::KeepAliveP99Ms, Stack::Anchor, anchor);
            samples.record(Figure::KeepAliveP99Ms, Stack::Edgible, edgible);
        }
        samples.record(Figure::EdgeRssMib, Stack::Anchor, 120.0);
        let text = table(&samples, &settings());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2 + Figure::ALL.len());
        assert!(lines[0].starts_with("| figure | anchor (HAProxy → boringtun → Caddy) | Edgible"), "{}", lines[0]);
        assert_eq!(
            lines[2],
            "| tunnel throughput, 1 TCP stream (Gb/s) | 0.680 (0.610–0.750) | 2.00 (1.90–2.10) | 2.94× | Edgible |"
        );
        assert!(
            text.contains("| keep-alive latency p99 (ms) | 35.0 (30.0–39.0) | 22.0 (20.0–25.0) | 0.63× | Edgible |"),
            "{text}"
        );
        assert!(text.contains("| edge RSS, 9,900 idle connections (MiB) | 120 | — | — |  |"), "{text}");
        assert!(text.contains("| HTTP/2, 50 connections × 10 streams (req/s) | — | — | — |  |"), "{text}");
    }

    #[test]
    fn targets_are_checked_against_the_ratios() {
        let mut samples = Samples::default();
        let mut both = |figure, anchor, edgible| {
            samples.record(figure, Stack::Anchor, anchor);
            samples.record(figure, Stack::Edgible, edgible);
        };
        both(Figure::TunnelGbps, 0.7, 2.8);
        both(Figure::KeepAliveRps, 4000.0, 6400.0);
        both(Figure::KeepAliveP99Ms, 30.0, 31.0);
        both(Figure::NewTlsPerSecond, 500.0, 1100.0);
        let checks = targets(&samples);
        assert_eq!(checks.len(), 4);
        assert_eq!((checks[0].measured.as_str(), checks[0].met), ("4.00×", Some(true)));
        assert_eq!(
            (checks[1].measured.as_str(), checks[1].met),
            ("1.60× the requests/s at 1.03× the p99", Some(false)),
            "a higher p99 misses the target even at 1.6× the rate"
        );
        assert_eq!((checks[2].measured.as_str(), checks[2].met), ("2.20×", Some(true)));
        assert_eq!((checks[3].measured.as_str(), checks[3].met), ("not measured", None));
        samples.record(Figure::EdgeKibPerConnection, Stack::Edgible, 40.0);
        assert_eq!(targets(&samples)[3].met, Some(false));
    }

    #[test]
    fn the_report_has_the_heading_the_table_the_targets_and_the_failures() {
        let mut samples = Samples::default();
        samples.record(Figure::TunnelGbps, Stack::Anchor, 0.7);
        samples.record(Figure::TunnelGbps, Stack::Edgible, 0.35);
        samples.fail("round 2, anchor, HTTP/2: h2load exited with 1".to_owned());
        samples.note("round 1, Edgible, keep-alive: 3 socket errors".to_owned());
        let text = render(&samples, &settings());
        assert!(text.starts_with("# Edgible vs. HAProxy → boringtun → Caddy\n"), "{text}");
        assert!(text.contains("- date: 2026-11-25 07:00 UTC\n"), "{text}");
        assert!(text.contains("- machine: 2 × Test CPU"), "{text}");
        assert!(text.contains("| tunnel throughput, 1 TCP stream (Gb/s) | 0.700 | 0.350 | 0.50× | anchor |"), "{text}");
        assert!(text.contains("- tunnel throughput ≥ 3× boringtun-cli: 0.50× — not met\n"), "{text}");
        assert!(text.contains("- new TLS connections/s ≥ 2×: not measured — not measured\n"), "{text}");
        assert!(
            text.contains("missing from the medians):\n\n- round 2, anchor, HTTP/2: h2load exited with 1\n"),
            "{text}"
        );
        assert!(text.ends_with("Notes:\n\n- round 1, Edgible, keep-alive: 3 socket errors\n"), "{text}");
    }
}
