//! The ClientHello parser against real first flights of curl, openssl s_client, rustls and
//! Chromium (captured by `edge/testdata/capture.sh`, see `edge/testdata/README.md`): whole
//! captures, every prefix, re-fragmented records, and corrupted variants.

#![allow(clippy::unwrap_used)]

use edgible_edge::sni::{
    MAX_CLIENT_HELLO_LEN, RECORD_HEADER_LEN, ServerName, ServerNameError, SniError, parse_client_hello,
};

struct Capture {
    file: &'static str,
    bytes: &'static [u8],
    /// The server name the parser must answer, after normalization.
    server_name: Option<&'static str>,
}

macro_rules! capture {
    ($file:literal, $server_name:expr) => {
        Capture { file: $file, bytes: include_bytes!(concat!("../testdata/", $file)), server_name: $server_name }
    };
}

const CAPTURES: &[Capture] = &[
    capture!("chromium.bin", Some("www.example.test")),
    capture!("curl.bin", Some("app.example.test")),
    capture!("curl-tls12.bin", Some("legacy.example.test")),
    capture!("curl-no-sni.bin", None),
    capture!("openssl.bin", Some("api.example.test")),
    capture!("openssl-tls12.bin", Some("tls12.example.test")),
    capture!("openssl-mixed-case.bin", Some("mixed.example.test")),
    capture!("openssl-trailing-dot.bin", Some("dot.example.test")),
    capture!("openssl-no-sni.bin", None),
    capture!("rustls.bin", Some("rustls.example.test")),
    capture!("rustls-no-sni.bin", None),
];

fn expected(capture: &Capture) -> Result<Option<ServerName>, SniError> {
    Ok(capture.server_name.map(|name| ServerName::parse(name.as_bytes()).unwrap()))
}

/// The handshake message inside a capture, with each record header removed.
fn handshake_message(bytes: &[u8]) -> Vec<u8> {
    let mut message = Vec::new();
    let mut rest = bytes;
    while let Some(header) = rest.get(..RECORD_HEADER_LEN) {
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        message.extend_from_slice(&rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len]);
        rest = &rest[RECORD_HEADER_LEN + len..];
    }
    message
}

/// Wraps a handshake message in records of at most `fragment` payload bytes.
fn records(message: &[u8], fragment: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in message.chunks(fragment) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// The position of the captured host name (as sent) inside a capture.
fn server_name_position(capture: &Capture) -> Option<(usize, usize)> {
    let raw = capture.server_name?;
    let sent = match capture.file {
        "openssl-mixed-case.bin" => "MiXeD.Example.TEST",
        _ => raw,
    };
    let start = capture.bytes.windows(sent.len()).position(|window| window == sent.as_bytes())?;
    Some((start, sent.len()))
}

/// What must hold between the answer for a prefix and the answer for the whole input: a
/// final answer on the prefix is the final answer, and `needed` never overshoots the bytes
/// that completed (or will complete) the ClientHello. Garbage may be refused before `needed`
/// more bytes arrived, so an error on the whole input puts no bound on `needed`.
fn assert_prefix_consistent(input: &[u8], cut: usize, whole: &Result<Option<ServerName>, SniError>, context: &str) {
    let prefix = parse_client_hello(&input[..cut]);
    match (&prefix, whole) {
        (Err(SniError::Incomplete { needed }), Err(SniError::Incomplete { needed: needed_whole })) => {
            assert!(*needed >= 1 && cut + needed <= input.len() + needed_whole, "{context}: cut {cut}")
        }
        (Err(SniError::Incomplete { needed }), Ok(_)) => {
            assert!(*needed >= 1 && cut + needed <= input.len(), "{context}: cut {cut}, needed {needed}")
        }
        (Err(SniError::Incomplete { needed }), Err(_)) => assert!(*needed >= 1, "{context}: cut {cut}"),
        (prefix, whole) => assert_eq!(prefix, whole, "{context}: a prefix of {cut} bytes answered differently"),
    }
}

/// A successful answer is always a normalized, valid name.
fn assert_name_valid(result: &Result<Option<ServerName>, SniError>) {
    if let Ok(Some(name)) = result {
        assert_eq!(ServerName::parse(name.as_str().as_bytes()).as_ref(), Ok(name));
        assert!(!name.as_str().bytes().any(|byte| byte.is_ascii_uppercase()));
    }
}

#[test]
fn every_capture_file_is_tested() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".bin"))
        .collect();
    files.sort();
    let mut listed: Vec<&str> = CAPTURES.iter().map(|capture| capture.file).collect();
    listed.sort();
    assert_eq!(files, listed);
}

#[test]
fn whole_captures_give_the_server_name() {
    for capture in CAPTURES {
        assert_eq!(parse_client_hello(capture.bytes), expected(capture), "{}", capture.file);
    }
}

#[test]
fn every_prefix_of_every_capture_is_incomplete() {
    for capture in CAPTURES {
        for cut in 0..capture.bytes.len() {
            match parse_client_hello(&capture.bytes[..cut]) {
                Err(SniError::Incomplete { needed }) => assert!(
                    needed >= 1 && cut + needed <= capture.bytes.len(),
                    "{}: prefix {cut} needs {needed}",
                    capture.file
                ),
                other => panic!("{}: a prefix of {cut} bytes answered {other:?}", capture.file),
            }
        }
    }
}

#[test]
fn reads_of_any_size_reach_the_answer_exactly_at_the_end() {
    for capture in CAPTURES {
        for read_size in [1, 2, 3, 5, 8, 13, 100, 1000] {
            let mut buffer = Vec::new();
            let mut answer = parse_client_hello(&buffer);
            for chunk in capture.bytes.chunks(read_size) {
                assert!(answer.as_ref().is_err_and(SniError::is_incomplete), "{}", capture.file);
                buffer.extend_from_slice(chunk);
                answer = parse_client_hello(&buffer);
            }
            assert_eq!(answer, expected(capture), "{} read {read_size} bytes at a time", capture.file);
        }
    }
}

#[test]
fn bytes_after_the_client_hello_do_not_change_the_answer() {
    for capture in CAPTURES {
        let mut bytes = capture.bytes.to_vec();
        // A change_cipher_spec record, then garbage.
        bytes.extend_from_slice(&[20, 3, 3, 0, 1, 1, 0xde, 0xad]);
        assert_eq!(parse_client_hello(&bytes), expected(capture), "{}", capture.file);
    }
}

#[test]
fn refragmented_captures_give_the_same_answer() {
    for capture in CAPTURES {
        let message = handshake_message(capture.bytes);
        for fragment in [1, 3, 4, 5, 64, 511, message.len() - 1] {
            let bytes = records(&message, fragment);
            let context = format!("{} in records of {fragment} bytes", capture.file);
            assert_eq!(parse_client_hello(&bytes), expected(capture), "{context}");
            for cut in 0..bytes.len() {
                assert!(parse_client_hello(&bytes[..cut]).unwrap_err().is_incomplete(), "{context}: cut {cut}");
            }
        }
    }
}

#[test]
fn fragmentation_is_accepted_up_to_the_bound() {
    // Chromium's hello in one-byte records takes six bytes of input per byte of hello and
    // still fits in the bound.
    let chromium = &CAPTURES[0];
    let message = handshake_message(chromium.bytes);
    let bytes = records(&message, 1);
    assert!(bytes.len() <= MAX_CLIENT_HELLO_LEN);
    assert_eq!(parse_client_hello(&bytes), expected(chromium));

    // With a padding extension it no longer does. The parser cannot know early that the
    // client will keep fragmenting (the rest could come in one record), so it refuses once
    // the records read so far leave no room for the rest, and never buffers past the bound.
    let padded = with_padding(&message, 1000);
    assert_eq!(parse_client_hello(&records(&padded, 1 << 14)), expected(chromium));
    let bytes = records(&padded, 1);
    assert!(bytes.len() > MAX_CLIENT_HELLO_LEN);
    let too_large = Err(SniError::TooLarge { limit: MAX_CLIENT_HELLO_LEN });
    assert_eq!(parse_client_hello(&bytes), too_large);
    let first_refusal = (0..bytes.len()).find(|cut| parse_client_hello(&bytes[..*cut]) == too_large).unwrap();
    assert!(first_refusal <= MAX_CLIENT_HELLO_LEN, "refused only after {first_refusal} bytes");
    for cut in 0..first_refusal {
        assert!(parse_client_hello(&bytes[..cut]).unwrap_err().is_incomplete());
    }
}

/// Appends a padding extension (RFC 7685) of `len` zero bytes to a ClientHello message,
/// fixing the extensions block and handshake lengths.
fn with_padding(message: &[u8], len: usize) -> Vec<u8> {
    let mut padded = message.to_vec();
    padded.extend_from_slice(&[0, 21]);
    padded.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
    padded.resize(padded.len() + len, 0);
    // The extensions block is last: find where it starts by walking the fixed fields.
    let session_id = 4 + 2 + 32;
    let cipher_suites = session_id + 1 + usize::from(padded[session_id]);
    let compression =
        cipher_suites + 2 + usize::from(u16::from_be_bytes([padded[cipher_suites], padded[cipher_suites + 1]]));
    let extensions = compression + 1 + usize::from(padded[compression]);
    let block_len = u16::try_from(padded.len() - extensions - 2).unwrap();
    padded[extensions..extensions + 2].copy_from_slice(&block_len.to_be_bytes());
    let body_len = u32::try_from(padded.len() - 4).unwrap();
    padded[1..4].copy_from_slice(&body_len.to_be_bytes()[1..]);
    padded
}

#[test]
fn corrupted_headers_are_refused() {
    for capture in CAPTURES {
        let corrupt = |position: usize, value: u8| {
            let mut bytes = capture.bytes.to_vec();
            bytes[position] = value;
            parse_client_hello(&bytes)
        };
        assert_eq!(corrupt(0, 23), Err(SniError::NotHandshake { content_type: 23 }), "{}", capture.file);
        assert_eq!(corrupt(1, 2), Err(SniError::UnsupportedVersion { major: 2 }));
        assert_eq!(corrupt(3, 0x41), Err(SniError::TooLarge { limit: MAX_CLIENT_HELLO_LEN }));
        assert_eq!(corrupt(5, 2), Err(SniError::NotClientHello { handshake_type: 2 }));
        // A handshake message claiming more than its record holds waits for another record,
        // unless it could never fit in the bound.
        assert!(corrupt(7, capture.bytes[7] + 1).unwrap_err().is_incomplete(), "{}", capture.file);
        assert_eq!(corrupt(6, 1), Err(SniError::TooLarge { limit: MAX_CLIENT_HELLO_LEN }));
    }
}

#[test]
fn a_record_cut_short_is_malformed() {
    for capture in CAPTURES {
        // Shorten both the record and the handshake message by one byte, so the extensions
        // (or the cipher suites, for the smallest hellos) run past the end.
        let mut bytes = capture.bytes[..capture.bytes.len() - 1].to_vec();
        let record_len = u16::from_be_bytes([bytes[3], bytes[4]]) - 1;
        bytes[3..5].copy_from_slice(&record_len.to_be_bytes());
        let message_len = u32::from_be_bytes([0, bytes[6], bytes[7], bytes[8]]) - 1;
        bytes[6..9].copy_from_slice(&message_len.to_be_bytes()[1..]);
        assert!(matches!(parse_client_hello(&bytes), Err(SniError::Malformed(_))), "{}", capture.file);
    }
}

#[test]
fn corrupted_server_names_are_refused() {
    for capture in CAPTURES {
        let Some((start, len)) = server_name_position(capture) else { continue };
        let corrupt = |offset: usize, value: u8| {
            let mut bytes = capture.bytes.to_vec();
            bytes[start + offset] = value;
            parse_client_hello(&bytes)
        };
        let invalid = |error| Err(SniError::InvalidServerName(error));
        assert_eq!(corrupt(1, 0), invalid(ServerNameError::InvalidByte), "{}", capture.file);
        assert_eq!(corrupt(len - 1, 0xff), invalid(ServerNameError::InvalidByte));
        assert_eq!(corrupt(0, b'-'), invalid(ServerNameError::LabelHyphen));
        assert_eq!(corrupt(0, b'.'), invalid(ServerNameError::EmptyLabel));
        assert_eq!(corrupt(0, b'*'), invalid(ServerNameError::InvalidByte));
        // The two bytes before the name are its length: one more than the entry holds.
        let mut bytes = capture.bytes.to_vec();
        bytes[start - 1] += 1;
        assert!(matches!(parse_client_hello(&bytes), Err(SniError::Malformed(_))), "{}", capture.file);
    }
}

#[test]
fn every_single_byte_corruption_is_handled() {
    for capture in CAPTURES {
        for position in 0..capture.bytes.len() {
            for mask in [0x01, 0x80, 0xff] {
                let mut bytes = capture.bytes.to_vec();
                bytes[position] ^= mask;
                let whole = parse_client_hello(&bytes);
                assert_name_valid(&whole);
                let context = format!("{} with byte {position} ^ {mask:#x}", capture.file);
                for cut in [position, position + 1, bytes.len() / 2, bytes.len() - 1] {
                    assert_prefix_consistent(&bytes, cut.min(bytes.len()), &whole, &context);
                }
            }
        }
    }
}

#[test]
fn random_mutations_keep_the_prefix_property() {
    // A small xorshift generator: deterministic, so a failure reproduces.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..3000 {
        let capture = &CAPTURES[round % CAPTURES.len()];
        let mut bytes = capture.bytes.to_vec();
        for _ in 0..=(next() % 4) {
            let position = (next() % bytes.len() as u64) as usize;
            match next() % 4 {
                0 => bytes[position] = next() as u8,
                1 => bytes.truncate(position + 1),
                2 => bytes.insert(position, next() as u8),
                _ => {
                    bytes.remove(position);
                }
            }
            if bytes.is_empty() {
                bytes.push(22);
            }
        }
        let whole = parse_client_hello(&bytes);
        assert_name_valid(&whole);
        for _ in 0..8 {
            let cut = (next() % (bytes.len() as u64 + 1)) as usize;
            assert_prefix_consistent(&bytes, cut, &whole, &format!("round {round} on {}", capture.file));
        }
    }
}

#[test]
fn garbage_never_panics() {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for len in 0..2000 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut handshake = bytes.clone();
        if let Some(first) = handshake.first_mut() {
            *first = 22;
        }
        for input in [bytes, handshake] {
            assert_name_valid(&parse_client_hello(&input));
        }
    }
}
