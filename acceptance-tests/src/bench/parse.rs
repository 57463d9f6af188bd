//! Reading what the load tools and the kernel print: `iperf3 --json`, `wrk --latency`,
//! `h2load`, `curl -w`, `/proc/<pid>/stat` and `/proc/<pid>/status`, `ip -o addr`, and the head
//! of an HTTP/1.1 response. Pure: text in, numbers out, so each format is tested with captured
//! output.

use std::net::Ipv4Addr;

/// What a tool printed that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("the {tool} output has no {what}")]
    Missing { tool: &'static str, what: &'static str },
    #[error("the {tool} output's {what} is not a number: {text:?}")]
    BadNumber { tool: &'static str, what: &'static str, text: String },
    #[error("the {tool} output is not the JSON expected: {source}")]
    Json {
        tool: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{tool} reported an error: {message}")]
    Reported { tool: &'static str, message: String },
}

type Result<T, E = ParseError> = std::result::Result<T, E>;

fn number<T: std::str::FromStr>(tool: &'static str, what: &'static str, text: &str) -> Result<T> {
    text.trim().parse().map_err(|_| ParseError::BadNumber { tool, what, text: text.trim().to_owned() })
}

/// One `iperf3 --json` test: what the receiver got.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IperfReport {
    /// Received rate, in Gb/s (10^9 bits per second).
    pub gbps: f64,
    /// Bytes received.
    pub bytes: u64,
    /// Seconds the test ran.
    pub seconds: f64,
}

impl IperfReport {
    /// The gigabits (10^9 bits) received.
    pub fn gigabits(&self) -> f64 {
        self.bytes as f64 * 8.0 / 1e9
    }
}

/// Reads `end.sum_received` of an `iperf3 --json` report; an `error` field is an error.
pub fn iperf3(json: &str) -> Result<IperfReport> {
    const TOOL: &str = "iperf3";
    let report: serde_json::Value =
        serde_json::from_str(json).map_err(|source| ParseError::Json { tool: TOOL, source })?;
    if let Some(message) = report.get("error").and_then(|error| error.as_str()) {
        return Err(ParseError::Reported { tool: TOOL, message: message.to_owned() });
    }
    let received = &report["end"]["sum_received"];
    let bits = received["bits_per_second"]
        .as_f64()
        .ok_or(ParseError::Missing { tool: TOOL, what: "end.sum_received.bits_per_second" })?;
    let bytes = received["bytes"].as_u64().ok_or(ParseError::Missing { tool: TOOL, what: "end.sum_received.bytes" })?;
    let seconds =
        received["seconds"].as_f64().ok_or(ParseError::Missing { tool: TOOL, what: "end.sum_received.seconds" })?;
    Ok(IperfReport { gbps: bits / 1e9, bytes, seconds })
}

/// One `wrk --latency` run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkReport {
    pub requests_per_second: f64,
    /// Responses completed.
    pub requests: u64,
    /// Median latency in ms (only with `--latency`).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in ms (only with `--latency`).
    pub p99_ms: Option<f64>,
    /// Socket errors of every kind (connect, read, write, timeout).
    pub socket_errors: u64,
    /// Responses whose status was not 2xx or 3xx.
    pub non_success: u64,
}

/// Reads `wrk`'s text report.
pub fn wrk(text: &str) -> Result<WrkReport> {
    const TOOL: &str = "wrk";
    let mut requests_per_second = None;
    let mut requests = None;
    let mut p50_ms = None;
    let mut p99_ms = None;
    let mut socket_errors = 0;
    let mut non_success = 0;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            requests_per_second = Some(number(TOOL, "Requests/sec", rest)?);
        } else if let Some((count, _)) = line.split_once(" requests in ") {
            requests = Some(number(TOOL, "request count", count)?);
        } else if let Some(rest) = line.strip_prefix("50%") {
            p50_ms = Some(wrk_duration_ms(rest)?);
        } else if let Some(rest) = line.strip_prefix("99%") {
            p99_ms = Some(wrk_duration_ms(rest)?);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // `connect 0, read 0, write 0, timeout 6`
            for part in rest.split(',') {
                let count = part
                    .split_whitespace()
                    .nth(1)
                    .ok_or(ParseError::Missing { tool: TOOL, what: "socket error count" })?;
                socket_errors += number::<u64>(TOOL, "socket error count", count)?;
            }
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_success = number(TOOL, "Non-2xx or 3xx responses", rest)?;
        }
    }
    Ok(WrkReport {
        requests_per_second: requests_per_second
            .ok_or(ParseError::Missing { tool: TOOL, what: "Requests/sec line" })?,
        requests: requests.ok_or(ParseError::Missing { tool: TOOL, what: "`N requests in` line" })?,
        p50_ms,
        p99_ms,
        socket_errors,
        non_success,
    })
}

/// A `wrk` duration (`812.00us`, `7.62ms`, `1.63s`, `2.00m`) in ms.
fn wrk_duration_ms(text: &str) -> Result<f64> {
    const TOOL: &str = "wrk";
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len());
    let (value, unit) = text.split_at(split);
    let value: f64 = number(TOOL, "latency", value)?;
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return Err(ParseError::BadNumber { tool: TOOL, what: "latency unit", text: text.to_owned() }),
    };
    Ok(value * scale)
}

/// One `h2load` run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct H2loadReport {
    pub requests_per_second: f64,
    pub succeeded: u64,
    /// Requests failed, errored or timed out.
    pub failed: u64,
    /// Responses with a 2xx status. In a timed run this may exceed `succeeded`: responses
    /// that arrive after the measured period are counted here but not there.
    pub status_2xx: u64,
    /// Responses with a 4xx or 5xx status.
    pub status_errors: u64,
}

/// Reads `h2load`'s text report.
pub fn h2load(text: &str) -> Result<H2loadReport> {
    const TOOL: &str = "h2load";
    let mut requests_per_second = None;
    let mut counts = None;
    let mut statuses = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // `3.03s, 690.67 req/s, 347.14KB/s`
            let rate = rest
                .split(',')
                .find_map(|part| part.trim().strip_suffix(" req/s"))
                .ok_or(ParseError::Missing { tool: TOOL, what: "req/s" })?;
            requests_per_second = Some(number(TOOL, "req/s", rate)?);
        } else if let Some(rest) = line.strip_prefix("requests:") {
            // `2072 total, 2572 started, 2072 done, 2072 succeeded, 0 failed, 0 errored, 0 timeout`
            let count = |name: &'static str| -> Result<u64> {
                let part = rest
                    .split(',')
                    .map(str::trim)
                    .find(|part| part.ends_with(name))
                    .ok_or(ParseError::Missing { tool: TOOL, what: name })?;
                number(TOOL, name, part.trim_end_matches(name))
            };
            counts = Some((count(" succeeded")?, count(" failed")? + count(" errored")? + count(" timeout")?));
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            // `2072 2xx, 0 3xx, 0 4xx, 0 5xx`
            let count = |class: &'static str| -> Result<u64> {
                let part = rest
                    .split(',')
                    .map(str::trim)
                    .find(|part| part.ends_with(class))
                    .ok_or(ParseError::Missing { tool: TOOL, what: class })?;
                number(TOOL, class, part.trim_end_matches(class))
            };
            statuses = Some((count(" 2xx")?, count(" 4xx")? + count(" 5xx")?));
        }
    }
    let (succeeded, failed) = counts.ok_or(ParseError::Missing { tool: TOOL, what: "`requests:` line" })?;
    let (status_2xx, status_errors) =
        statuses.ok_or(ParseError::Missing { tool: TOOL, what: "`status codes:` line" })?;
    Ok(H2loadReport {
        requests_per_second: requests_per_second
            .ok_or(ParseError::Missing { tool: TOOL, what: "`finished in` line" })?,
        succeeded,
        failed,
        status_2xx,
        status_errors,
    })
}

/// What `curl -w '%{http_code} %{size_download} %{time_total}'` printed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurlTransfer {
    pub status: u16,
    pub bytes: u64,
    pub seconds: f64,
}

/// Reads the `-w` line of [`CurlTransfer`].
pub fn curl_transfer(text: &str) -> Result<CurlTransfer> {
    const TOOL: &str = "curl";
    let mut words = text.split_whitespace();
    let mut next = |what: &'static str| words.next().ok_or(ParseError::Missing { tool: TOOL, what });
    Ok(CurlTransfer {
        status: number(TOOL, "http_code", next("http_code")?)?,
        bytes: number(TOOL, "size_download", next("size_download")?)?,
        seconds: number(TOOL, "time_total", next("time_total")?)?,
    })
}

/// The CPU time a process used so far (`utime + stime`, fields 14 and 15 of
/// `/proc/<pid>/stat`), in clock ticks. Every thread counts.
pub fn proc_stat_ticks(stat: &str) -> Result<u64> {
    const TOOL: &str = "/proc/<pid>/stat";
    // The command name (field 2) is in parentheses and may hold spaces and parentheses itself;
    // the fields after the last `)` start with field 3, the state.
    let (_, rest) = stat.rsplit_once(')').ok_or(ParseError::Missing { tool: TOOL, what: "command name" })?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |index: usize, what: &'static str| -> Result<u64> {
        number(TOOL, what, fields.get(index).ok_or(ParseError::Missing { tool: TOOL, what })?)
    };
    Ok(field(11, "utime")? + field(12, "stime")?)
}

/// The resident set size (`VmRSS`) of `/proc/<pid>/status`, in KiB.
pub fn proc_status_rss_kib(status: &str) -> Result<u64> {
    const TOOL: &str = "/proc/<pid>/status";
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .ok_or(ParseError::Missing { tool: TOOL, what: "VmRSS" })?;
    number(TOOL, "VmRSS", line.trim().trim_end_matches("kB"))
}

/// The IPv4 addresses in `ip -4 -o addr show` output.
pub fn ip_addresses(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|word| *word == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// Why an HTTP/1.1 response head is not the one expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("the response does not start with a status line: {0:?}")]
    NoStatusLine(String),
    #[error("the response's status is {0}, not 200")]
    Status(u16),
    #[error("the response has no Content-Length (the origin always sends one)")]
    NoContentLength,
    #[error("the response head is larger than {0} bytes")]
    HeadTooLarge(usize),
}

/// The largest response head accepted.
pub const MAX_RESPONSE_HEAD: usize = 16 << 10;

/// How long the whole `200` response starting `bytes` is (head and body), once its head is
/// complete: `Ok(None)` while the head is incomplete.
pub fn http1_response_len(bytes: &[u8]) -> Result<Option<usize>, ResponseError> {
    let Some(end) = bytes.windows(4).position(|window| window == b"\r\n\r\n") else {
        if bytes.len() > MAX_RESPONSE_HEAD {
            return Err(ResponseError::HeadTooLarge(MAX_RESPONSE_HEAD));
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&bytes[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| ResponseError::NoStatusLine(status_line.chars().take(80).collect()))?;
    if status != 200 {
        return Err(ResponseError::Status(status));
    }
    let length = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .ok_or(ResponseError::NoContentLength)?;
    Ok(Some(end + 4 + length))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IPERF3: &str = r#"{
        "start": {"test_start": {"protocol": "TCP", "num_streams": 1}},
        "end": {
            "sum_sent": {"start": 0, "end": 5.0, "seconds": 5.0, "bytes": 437780480, "bits_per_second": 700448768},
            "sum_received": {"start": 0, "end": 5.04, "seconds": 5.04, "bytes": 436207616, "bits_per_second": 692393041.2}
        }
    }"#;

    #[test]
    fn iperf3_reads_what_the_receiver_got() -> anyhow::Result<()> {
        let report = iperf3(IPERF3)?;
        assert!((report.gbps - 0.692_393).abs() < 1e-6, "{report:?}");
        assert_eq!(report.bytes, 436_207_616);
        assert!((report.seconds - 5.04).abs() < 1e-9);
        assert!((report.gigabits() - 3.489_660_928).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn iperf3_errors_are_reported_not_read_as_zero() {
        let error = iperf3(r#"{"start": {}, "end": {}, "error": "unable to connect to server: Connection refused"}"#)
            .expect_err("an error report");
        assert!(error.to_string().contains("Connection refused"), "{error}");
        let error = iperf3(r#"{"end": {}}"#).expect_err("no sum_received");
        assert!(error.to_string().contains("end.sum_received.bits_per_second"), "{error}");
        assert!(matches!(iperf3("iperf3: error"), Err(ParseError::Json { .. })));
    }

    const WRK: &str = "\
Running 3s test @ https://bench.example.test:8443/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   160.02ms  357.03ms   1.87s    86.60%
    Req/Sec   456.00    246.19     1.07k    63.79%
  Latency Distribution
     50%  812.00us
     75%   15.94ms
     90%  721.45ms
     99%    1.63s 
  2672 requests in 3.02s, 1.75MB read
  Socket errors: connect 0, read 2, write 0, timeout 6
  Non-2xx or 3xx responses: 3
Requests/sec:    885.79
Transfer/sec:    595.14KB
";

    #[test]
    fn wrk_reads_rate_percentiles_and_errors() -> anyhow::Result<()> {
        let report = wrk(WRK)?;
        assert_eq!(report.requests_per_second, 885.79);
        assert_eq!(report.requests, 2672);
        assert_eq!(report.p50_ms, Some(0.812));
        assert_eq!(report.p99_ms, Some(1630.0));
        assert_eq!(report.socket_errors, 8);
        assert_eq!(report.non_success, 3);
        Ok(())
    }

    #[test]
    fn wrk_without_latency_has_no_percentiles_and_a_cut_report_is_an_error() -> anyhow::Result<()> {
        let plain = "  1141 requests in 3.08s, 787.78KB read\nRequests/sec:    370.51\n";
        let report = wrk(plain)?;
        assert_eq!((report.requests, report.p50_ms, report.socket_errors), (1141, None, 0));
        let error = wrk("Running 3s test @ https://x/\n").expect_err("no summary");
        assert!(error.to_string().contains("Requests/sec"), "{error}");
        assert!(matches!(wrk_duration_ms("3.5parsecs"), Err(ParseError::BadNumber { .. })));
        assert_eq!(wrk_duration_ms("2.00m")?, 120_000.0);
        Ok(())
    }

    const H2LOAD: &str = "\
starting benchmark...
Application protocol: h2
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 3.03s, 690.67 req/s, 347.14KB/s
requests: 2072 total, 2572 started, 2072 done, 2060 succeeded, 10 failed, 1 errored, 1 timeout
status codes: 2161 2xx, 0 3xx, 2 4xx, 1 5xx
traffic: 1.02MB (1066419) total, 18.93KB (19381) headers (space savings 94.47%), 983.39KB (1006992) data
";

    #[test]
    fn h2load_reads_rate_and_counts() -> anyhow::Result<()> {
        let report = h2load(H2LOAD)?;
        assert_eq!(report.requests_per_second, 690.67);
        assert_eq!((report.succeeded, report.failed, report.status_2xx, report.status_errors), (2060, 12, 2161, 3));
        let error = h2load("finished in 3.03s, 690.67 req/s, 347.14KB/s\n").expect_err("no counts");
        assert!(error.to_string().contains("requests:"), "{error}");
        Ok(())
    }

    #[test]
    fn curl_transfer_reads_its_write_out_line() -> anyhow::Result<()> {
        let transfer = curl_transfer("200 1073741824 9.812345\n")?;
        assert_eq!(transfer, CurlTransfer { status: 200, bytes: 1 << 30, seconds: 9.812_345 });
        assert!(curl_transfer("200 12").is_err());
        assert!(curl_transfer("000 0 x").is_err());
        Ok(())
    }

    #[test]
    fn proc_stat_sums_user_and_system_time_even_with_odd_command_names() -> anyhow::Result<()> {
        let stat = "4242 (edgible (edge) x) S 1 4242 4242 0 -1 4194560 1180 0 0 0 1234 567 0 0 20 0 5 0 123 4567 89";
        assert_eq!(proc_stat_ticks(stat)?, 1234 + 567);
        assert!(proc_stat_ticks("4242 (short) S 1 2").is_err());
        assert!(proc_stat_ticks("no parentheses").is_err());
        Ok(())
    }

    #[test]
    fn proc_status_reads_the_resident_set() -> anyhow::Result<()> {
        let status = "Name:\tedgible-edge\nVmPeak:\t  900000 kB\nVmRSS:\t   23456 kB\nThreads:\t5\n";
        assert_eq!(proc_status_rss_kib(status)?, 23_456);
        assert!(proc_status_rss_kib("Name:\tzombie\n").is_err());
        Ok(())
    }

    #[test]
    fn ip_addresses_reads_inet_lines() {
        let text = "5: edgible0    inet 100.64.20.2/24 scope global edgible0\\       valid_lft forever preferred_lft forever\n\
                    5: edgible0    inet 100.64.20.9/32 scope global edgible0\n";
        assert_eq!(ip_addresses(text), [Ipv4Addr::new(100, 64, 20, 2), Ipv4Addr::new(100, 64, 20, 9)]);
        assert!(ip_addresses("").is_empty());
    }

    #[test]
    fn a_response_is_complete_after_its_head_and_content_length() {
        let response = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
        let head_end = response.len() - 5;
        for prefix in 0..head_end {
            assert_eq!(http1_response_len(&response[..prefix]), Ok(None), "prefix {prefix}");
        }
        assert_eq!(http1_response_len(&response[..head_end]), Ok(Some(response.len())));
        assert_eq!(http1_response_len(response), Ok(Some(response.len())));
    }

    #[test]
    fn unexpected_responses_are_errors() {
        assert_eq!(
            http1_response_len(b"HTTP/1.1 421 Misdirected Request\r\ncontent-length: 0\r\n\r\n"),
            Err(ResponseError::Status(421))
        );
        assert_eq!(
            http1_response_len(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
            Err(ResponseError::NoContentLength)
        );
        assert!(matches!(http1_response_len(b"SSH-2.0-OpenSSH\r\n\r\n"), Err(ResponseError::NoStatusLine(_))));
        assert_eq!(
            http1_response_len(&vec![b'a'; MAX_RESPONSE_HEAD + 1]),
            Err(ResponseError::HeadTooLarge(MAX_RESPONSE_HEAD))
        );
    }
}
