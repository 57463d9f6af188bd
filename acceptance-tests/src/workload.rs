//! The pure parts of the data path's test workload (`src/bin/e2e_workload.rs`), shared with
//! the tests that check what it answers: the deterministic download pattern, the query
//! parsing, and the texts it answers with.

use sha2::{Digest, Sha256};

/// The largest download the workload serves (a guard against a typo asking for terabytes).
pub const MAX_DOWNLOAD: u64 = 1 << 32;

/// Byte `offset` of every download: a repeating ramp whose period (251, a prime) does not
/// divide any buffer size, so a lost, repeated or reordered chunk changes the checksum.
pub fn pattern_byte(offset: u64) -> u8 {
    // The remainder is below 251, so it fits in a byte.
    (offset % 251) as u8
}

/// Fills `buffer` with the pattern from `offset` on.
pub fn fill_pattern(offset: u64, buffer: &mut [u8]) {
    for (index, byte) in buffer.iter_mut().enumerate() {
        *byte = pattern_byte(offset + index as u64);
    }
}

/// The hex SHA-256 of the first `len` bytes of the pattern.
pub fn pattern_sha256(len: u64) -> String {
    let mut digest = Sha256::new();
    let mut buffer = vec![0u8; 64 << 10];
    let mut offset = 0;
    while offset < len {
        let chunk = usize::try_from((len - offset).min(buffer.len() as u64)).unwrap_or(buffer.len());
        fill_pattern(offset, &mut buffer[..chunk]);
        digest.update(&buffer[..chunk]);
        offset += chunk as u64;
    }
    hex::encode(digest.finalize())
}

/// Why a download query is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("query parameter `bytes` is missing")]
    MissingBytes,
    #[error("query parameter `bytes` must be a whole number of bytes, got {0:?}")]
    BadBytes(String),
    #[error("query parameter `bytes` may be at most {MAX_DOWNLOAD}, got {0}")]
    TooLarge(u64),
}

/// The `bytes` parameter of `GET /download?bytes=N`.
pub fn download_len(query: Option<&str>) -> Result<u64, QueryError> {
    let value = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("bytes="))
        .ok_or(QueryError::MissingBytes)?;
    let len: u64 = value.parse().map_err(|_| QueryError::BadBytes(value.to_owned()))?;
    if len > MAX_DOWNLOAD {
        return Err(QueryError::TooLarge(len));
    }
    Ok(len)
}

/// What `GET /` answers: who answered (its name, and its pid, which tells a test the network
/// namespace, and so the device, it runs in), the forwarding headers the proxy set, and the
/// identity it vouched for (`X-Edgible-User`, `X-Edgible-Email`); `-` when absent. One
/// `key=value` per line, so tests (and a browser showing the page) can pick lines.
pub fn greeting(name: &str, pid: u32, headers: &Forwarded<'_>) -> String {
    let show = |value: Option<&str>| value.unwrap_or("-").to_owned();
    format!(
        "name={name}\npid={pid}\nx-forwarded-for={}\nx-forwarded-proto={}\nx-forwarded-host={}\n\
         x-edgible-user={}\nx-edgible-email={}\n",
        show(headers.forwarded_for),
        show(headers.proto),
        show(headers.host),
        show(headers.user),
        show(headers.email),
    )
}

/// The headers of a request that [`greeting`] shows.
#[derive(Debug, Default, Clone, Copy)]
pub struct Forwarded<'a> {
    pub forwarded_for: Option<&'a str>,
    pub proto: Option<&'a str>,
    pub host: Option<&'a str>,
    pub user: Option<&'a str>,
    pub email: Option<&'a str>,
}

/// What `GET /headers` answers: every request header as a `name=value` line (names in lower
/// case, in the order received; values that are not text shown as `<binary>`), so a test
/// sees exactly what the proxy let through.
pub fn header_lines<'a>(headers: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> String {
    headers
        .into_iter()
        .map(|(name, value)| format!("{}={}\n", name.to_ascii_lowercase(), value.unwrap_or("<binary>")))
        .collect()
}

/// Why a `GET /connect?to=ADDRESS:PORT` query is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectQueryError {
    #[error("query parameter `to` is missing")]
    MissingTo,
    #[error("query parameter `to` must be IPv4-ADDRESS:PORT, got {0:?}")]
    BadTo(String),
}

/// The `to` parameter of `GET /connect?to=ADDRESS:PORT`: where the workload tries to open a
/// TCP connection (the cloud tests check from inside one guest that another is unreachable).
pub fn connect_target(query: Option<&str>) -> Result<std::net::SocketAddrV4, ConnectQueryError> {
    let value = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("to="))
        .ok_or(ConnectQueryError::MissingTo)?;
    value.parse().map_err(|_| ConnectQueryError::BadTo(value.to_owned()))
}

/// What `GET /connect` answers: `outcome=connected`, or `outcome=failed` with the reason
/// (`refused`, `timeout` or the error's text).
pub fn connect_outcome(target: std::net::SocketAddrV4, result: Result<(), String>) -> String {
    match result {
        Ok(()) => format!("to={target}\noutcome=connected\n"),
        Err(reason) => format!("to={target}\noutcome=failed\nreason={reason}\n"),
    }
}

/// What `GET /whereami` answers: the kernel's boot id and release of the machine the workload
/// runs on, so a test tells a microVM (its own kernel, its own boot) from the host, and its
/// IPv4 addresses other than loopback (comma-separated, `-` if none).
pub fn whereami(boot_id: &str, kernel_release: &str, addresses: &[std::net::Ipv4Addr]) -> String {
    let addresses = if addresses.is_empty() {
        "-".to_owned()
    } else {
        addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
    };
    format!("boot_id={}\nkernel={}\naddresses={addresses}\n", boot_id.trim(), kernel_release.trim())
}

/// The local IPv4 addresses (not loopback) in `/proc/net/fib_trie`'s text, sorted, each once:
/// a leaf line `|-- ADDRESS` followed by a `/32 host LOCAL` line. Read from procfs because a
/// guest's minimal image has no `ip` command.
pub fn local_addresses(fib_trie: &str) -> Vec<std::net::Ipv4Addr> {
    let mut addresses = Vec::new();
    let mut leaf: Option<std::net::Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let line = line.trim();
        if let Some(address) = line.strip_prefix("|-- ") {
            leaf = address.trim().parse().ok();
        } else if line.starts_with("/32 host LOCAL")
            && let Some(address) = leaf
            && !address.is_loopback()
        {
            addresses.push(address);
        }
    }
    addresses.sort_unstable();
    addresses.dedup();
    addresses
}

/// What `POST /upload` answers: the hex SHA-256 of the body and its length.
pub fn upload_receipt(sha256_hex: &str, len: u64) -> String {
    format!("sha256={sha256_hex}\nbytes={len}\n")
}

/// The value of `key` in an answer made of `key=value` lines.
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
}

// ---------------------------------------------------------------------------------------------
// The stateful endpoints (issue 10's migration tests): records appended to a file in the
// application's volume, a large fill file, a slow request, and a health check that fails on
// one device.

/// The volume the stateful endpoints write to: the agent passes its path as
/// `EDGIBLE_VOLUME_DATA` (volume `data`).
pub const RECORDS_VOLUME_ENV: &str = "EDGIBLE_VOLUME_DATA";
/// The file, in the volume, that holds one record id per line.
pub const RECORDS_FILE: &str = "records.log";
/// The file, in the volume, that `POST /fill` writes.
pub const FILL_FILE: &str = "fill.bin";
/// The environment variable naming an IPv4 address: the workload's health check fails on the
/// machine that has it (the migration tests make one device's target unhealthy).
pub const UNHEALTHY_AT_ENV: &str = "UNHEALTHY_AT";
/// The longest `GET /slow` waits.
pub const MAX_SLOW_MS: u64 = 60_000;

/// Why a stateful request is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the record id must be a whole number after /records/, got {0:?}")]
    BadId(String),
    #[error("query parameter `ms` must be a whole number of milliseconds up to {MAX_SLOW_MS}, got {0:?}")]
    BadMs(String),
    #[error("line {line} of the records listing is not a record id: {text:?}")]
    BadListing { line: usize, text: String },
}

/// The id of `POST /records/ID`.
pub fn record_id(path: &str) -> Result<u64, RecordError> {
    let text = path.strip_prefix("/records/").unwrap_or(path);
    text.parse().map_err(|_| RecordError::BadId(text.to_owned()))
}

/// What `POST /records/ID` answers once the record is on disk: the id and where it was stored
/// (the machine's addresses, which tell the test the device).
pub fn record_receipt(id: u64, addresses: &[std::net::Ipv4Addr]) -> String {
    format!("stored={id}\naddresses={}\n", address_list(addresses))
}

/// The addresses as `GET /whereami` and the record receipts show them.
pub fn address_list(addresses: &[std::net::Ipv4Addr]) -> String {
    if addresses.is_empty() {
        "-".to_owned()
    } else {
        addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
    }
}

/// The distinct record ids of the records file (one per line; a line cut short by a crash
/// before its fsync, i.e. never acknowledged, is skipped).
pub fn stored_ids(file: &str) -> std::collections::BTreeSet<u64> {
    file.lines().filter_map(|line| line.trim().parse().ok()).collect()
}

/// What `GET /records` answers: `count=N` (distinct ids), `lines=N` (appends, counting
/// repeats of an id whose first answer was lost), then one id per line.
pub fn records_listing(file: &str) -> String {
    let ids = stored_ids(file);
    let mut text = format!("count={}\nlines={}\n", ids.len(), file.lines().count());
    for id in ids {
        text.push_str(&format!("{id}\n"));
    }
    text
}

/// The ids of a [`records_listing`].
pub fn parse_records_listing(text: &str) -> Result<std::collections::BTreeSet<u64>, RecordError> {
    let mut ids = std::collections::BTreeSet::new();
    for (index, line) in text.lines().enumerate() {
        if line.contains('=') {
            continue;
        }
        let id = line.parse().map_err(|_| RecordError::BadListing { line: index + 1, text: line.to_owned() })?;
        ids.insert(id);
    }
    Ok(ids)
}

/// The `ms` parameter of `GET /slow?ms=N`.
pub fn slow_ms(query: Option<&str>) -> Result<u64, RecordError> {
    let value = query.unwrap_or_default().split('&').find_map(|pair| pair.strip_prefix("ms=")).unwrap_or_default();
    match value.parse() {
        Ok(ms) if ms <= MAX_SLOW_MS => Ok(ms),
        _ => Err(RecordError::BadMs(value.to_owned())),
    }
}

/// Whether the health check fails here: `UNHEALTHY_AT` (its value, if set) is one of this
/// machine's `addresses`.
pub fn unhealthy_here(unhealthy_at: Option<&str>, addresses: &[std::net::Ipv4Addr]) -> bool {
    unhealthy_at
        .and_then(|text| text.trim().parse::<std::net::Ipv4Addr>().ok())
        .is_some_and(|address| addresses.contains(&address))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_continues_across_buffers() {
        let mut whole = vec![0u8; 1000];
        fill_pattern(0, &mut whole);
        let mut first = vec![0u8; 333];
        let mut second = vec![0u8; 667];
        fill_pattern(0, &mut first);
        fill_pattern(333, &mut second);
        assert_eq!([first, second].concat(), whole);
        assert_eq!(whole[250], 250);
        assert_eq!(whole[251], 0);
    }

    #[test]
    fn the_pattern_checksum_matches_a_direct_one() {
        let mut bytes = vec![0u8; 200_000];
        fill_pattern(0, &mut bytes);
        assert_eq!(pattern_sha256(200_000), hex::encode(Sha256::digest(&bytes)));
        assert_eq!(pattern_sha256(0), hex::encode(Sha256::digest(b"")));
    }

    #[test]
    fn download_queries_are_parsed_and_bad_ones_named() {
        assert_eq!(download_len(Some("bytes=100")), Ok(100));
        assert_eq!(download_len(Some("x=1&bytes=7")), Ok(7));
        assert_eq!(download_len(None), Err(QueryError::MissingBytes));
        assert_eq!(download_len(Some("bytes=ten")), Err(QueryError::BadBytes("ten".into())));
        assert_eq!(download_len(Some("bytes=-1")), Err(QueryError::BadBytes("-1".into())));
        assert_eq!(
            download_len(Some(&format!("bytes={}", MAX_DOWNLOAD + 1))),
            Err(QueryError::TooLarge(MAX_DOWNLOAD + 1))
        );
        assert!(download_len(Some("bytes=ten")).expect_err("bad").to_string().contains("`bytes`"));
    }

    #[test]
    fn connect_queries_are_parsed_and_answered() {
        let target: std::net::SocketAddrV4 = "198.51.100.6:8080".parse().expect("an address");
        assert_eq!(connect_target(Some("to=198.51.100.6:8080")), Ok(target));
        assert_eq!(connect_target(Some("x=1&to=198.51.100.6:8080")), Ok(target));
        assert_eq!(connect_target(None), Err(ConnectQueryError::MissingTo));
        assert_eq!(connect_target(Some("to=host:80")), Err(ConnectQueryError::BadTo("host:80".into())));
        assert_eq!(connect_target(Some("to=198.51.100.6")), Err(ConnectQueryError::BadTo("198.51.100.6".into())));
        let connected = connect_outcome(target, Ok(()));
        assert_eq!(field(&connected, "outcome"), Some("connected"));
        let failed = connect_outcome(target, Err("timeout".into()));
        assert_eq!(field(&failed, "outcome"), Some("failed"));
        assert_eq!(field(&failed, "reason"), Some("timeout"));
        let guest: std::net::Ipv4Addr = "198.51.100.2".parse().expect("an address");
        let here = whereami("abc\n", "6.1.0-56-cloud-amd64\n", &[guest]);
        assert_eq!(field(&here, "boot_id"), Some("abc"));
        assert_eq!(field(&here, "kernel"), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(field(&here, "addresses"), Some("198.51.100.2"));
        assert_eq!(field(&whereami("a", "k", &[]), "addresses"), Some("-"));
    }

    /// `/proc/net/fib_trie` of a guest with one address on eth0 (both tables list it).
    const FIB_TRIE: &str = "\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 198.51.100.0/30 2 0 2
        |-- 198.51.100.0
           /30 link UNICAST
        |-- 198.51.100.2
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 198.51.100.0/30 2 0 2
        |-- 198.51.100.2
           /32 host LOCAL
        |-- 198.51.100.3
           /32 link BROADCAST
";

    #[test]
    fn local_addresses_are_read_from_the_fib_trie() {
        let guest: std::net::Ipv4Addr = "198.51.100.2".parse().expect("an address");
        assert_eq!(local_addresses(FIB_TRIE), vec![guest]);
        assert!(local_addresses("").is_empty());
    }

    #[test]
    fn answers_are_lines_tests_can_read() {
        let headers = Forwarded {
            forwarded_for: Some("203.0.113.100"),
            proto: Some("https"),
            email: Some("a@example.test"),
            ..Forwarded::default()
        };
        let text = greeting("app-a", 42, &headers);
        assert_eq!(field(&text, "name"), Some("app-a"));
        assert_eq!(field(&text, "pid"), Some("42"));
        assert_eq!(field(&text, "x-forwarded-for"), Some("203.0.113.100"));
        assert_eq!(field(&text, "x-forwarded-proto"), Some("https"));
        assert_eq!(field(&text, "x-forwarded-host"), Some("-"));
        assert_eq!(field(&text, "x-edgible-user"), Some("-"));
        assert_eq!(field(&text, "x-edgible-email"), Some("a@example.test"));
        let lines = header_lines([("Accept", Some("*/*")), ("X-Bin", None)]);
        assert_eq!(lines, "accept=*/*\nx-bin=<binary>\n");
        assert_eq!(field(&lines, "accept"), Some("*/*"));
        assert_eq!(field(&text, "missing"), None);
        let receipt = upload_receipt("abc", 3);
        assert_eq!(field(&receipt, "sha256"), Some("abc"));
        assert_eq!(field(&receipt, "bytes"), Some("3"));
    }

    #[test]
    fn record_requests_are_parsed_and_listed() {
        assert_eq!(record_id("/records/42"), Ok(42));
        assert_eq!(record_id("/records/x"), Err(RecordError::BadId("x".into())));
        assert_eq!(record_id("/records/"), Err(RecordError::BadId(String::new())));
        let here: std::net::Ipv4Addr = "203.0.113.21".parse().expect("an address");
        let receipt = record_receipt(7, &[here]);
        assert_eq!(field(&receipt, "stored"), Some("7"));
        assert_eq!(field(&receipt, "addresses"), Some("203.0.113.21"));
        assert_eq!(field(&record_receipt(7, &[]), "addresses"), Some("-"));
        // A repeated id counts once; a torn last line (no fsync, never acknowledged) is skipped.
        let listing = records_listing("3\n1\n3\n2\n4");
        assert_eq!(field(&listing, "count"), Some("4"));
        assert_eq!(field(&listing, "lines"), Some("5"));
        assert_eq!(parse_records_listing(&listing), Ok([1, 2, 3, 4].into_iter().collect()));
        assert_eq!(stored_ids("1\n2\n3x"), [1, 2].into_iter().collect());
        assert_eq!(
            parse_records_listing("count=1\nnope\n"),
            Err(RecordError::BadListing { line: 2, text: "nope".into() })
        );
    }

    #[test]
    fn slow_queries_and_the_unhealthy_address_are_read() {
        assert_eq!(slow_ms(Some("ms=1500")), Ok(1500));
        assert_eq!(slow_ms(None), Err(RecordError::BadMs(String::new())));
        assert_eq!(slow_ms(Some("ms=600001")), Err(RecordError::BadMs("600001".into())));
        let here: std::net::Ipv4Addr = "203.0.113.22".parse().expect("an address");
        assert!(unhealthy_here(Some("203.0.113.22"), &[here]));
        assert!(!unhealthy_here(Some("203.0.113.21"), &[here]));
        assert!(!unhealthy_here(Some("not an address"), &[here]));
        assert!(!unhealthy_here(None, &[here]));
    }
}
