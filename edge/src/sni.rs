//! A pure parser for the first flight of a TLS client: bytes in, the requested server name out.
//!
//! The edge never terminates TLS. It peeks at the ClientHello a client sends first, reads the
//! `server_name` extension (RFC 6066, section 3) and routes the still-encrypted stream by it.
//! [`parse_client_hello`] does no IO: the caller appends every read to one buffer and calls it
//! again on the whole buffer until it answers something other than [`SniError::Incomplete`].
//!
//! # What is accepted
//!
//! - One or more TLS records of content type `handshake` (22) with record version major 3,
//!   each at most 2^14 bytes long and never empty, whose payloads concatenate to a
//!   ClientHello handshake message. All of it must fit in [`MAX_CLIENT_HELLO_LEN`] bytes of
//!   input (one full record and its header), so a client cannot make the edge buffer more
//!   than that, however it fragments its hello.
//! - The ClientHello body is checked for structure (session id at most 32 bytes, non-empty
//!   cipher suites of even length, at least one compression method, extension lengths that
//!   add up exactly). A hello without extensions (TLS 1.0 to 1.2 allow it) has no server name.
//! - Bytes after the ClientHello (a `change_cipher_spec` record, early data) are ignored: they
//!   belong to the stream the caller forwards, not to the routing decision.
//!
//! # Server names
//!
//! The `server_name` extension must appear at most once, hold a non-empty list and at most one
//! entry of type `host_name` (0); entries of other types are skipped, as RFC 6066 gives every
//! entry a 16-bit length. The host name is then normalized and validated by
//! [`ServerName::parse`]:
//!
//! - it must be ASCII (internationalized names arrive as `xn--` A-labels), without NUL or any
//!   other byte outside letters, digits, `-` and `.`;
//! - ASCII letters are lowercased, as DNS names compare case-insensitively;
//! - one trailing dot (the absolute form, `app.example.test.`) is removed, because RFC 6066
//!   forbids it yet some clients send it and it names the same host; two are an empty label;
//! - at most 253 characters, labels of 1 to 63 characters that neither start nor end with `-`;
//! - the last label is not all digits, which also refuses IPv4 literals (RFC 6066 forbids
//!   literal addresses; IPv6 literals already fail on `:`).
//!
//! The device's TLS server must normalize the same way; [`ServerName::parse`] is public for it.
//!
//! # Errors
//!
//! [`SniError::Incomplete`] is the only answer that more bytes can change. Every other error
//! is final for the connection, and no prefix of a valid ClientHello ever produces one.

use std::borrow::Cow;
use std::fmt;

/// The length of a TLS record header: content type, version, payload length.
pub const RECORD_HEADER_LEN: usize = 5;

/// The largest payload of a plaintext TLS record (2^14, RFC 8446 section 5.1).
pub const MAX_RECORD_PAYLOAD_LEN: usize = 16 * 1024;

/// The most input the parser looks at: one full record and its header. A ClientHello split
/// across several records must fit in this many bytes, headers included.
pub const MAX_CLIENT_HELLO_LEN: usize = RECORD_HEADER_LEN + MAX_RECORD_PAYLOAD_LEN;

/// The longest DNS name in its textual form, without a trailing dot (RFC 1035 section 2.3.4).
pub const MAX_SERVER_NAME_LEN: usize = 253;

/// The longest DNS label (RFC 1035 section 2.3.4).
const MAX_LABEL_LEN: usize = 63;

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_TYPE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_HEADER_LEN: usize = 4;
const EXTENSION_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST_NAME: u8 = 0;
const MAX_SESSION_ID_LEN: usize = 32;
const RANDOM_LEN: usize = 32;

/// Why the first bytes of a connection did not yield a routing decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    /// The input is a valid beginning, but the ClientHello is not complete yet: read more,
    /// append it, and parse the whole buffer again. The ClientHello cannot be complete before
    /// at least `needed` more bytes have arrived (garbage may be refused sooner), so a caller
    /// may size its next read by it.
    #[error("the ClientHello is incomplete: at least {needed} more bytes are needed")]
    Incomplete { needed: usize },
    /// The first bytes are not a TLS handshake record (plain HTTP on port 443, an SSLv2
    /// hello, or another record type such as an alert).
    #[error("not a TLS handshake record (content type {content_type:#04x})")]
    NotHandshake { content_type: u8 },
    /// The record header names a protocol version this parser does not know. Only the major
    /// version is checked (clients send minor versions 0 to 4 in their first record), so
    /// only it is reported.
    #[error("unsupported TLS record major version {major}")]
    UnsupportedVersion { major: u8 },
    /// The first handshake message is something other than a ClientHello.
    #[error("the first handshake message is not a ClientHello (handshake type {handshake_type})")]
    NotClientHello { handshake_type: u8 },
    /// A record is longer than TLS allows, or the ClientHello would not fit in
    /// [`MAX_CLIENT_HELLO_LEN`] bytes of input.
    #[error("the ClientHello does not fit in {limit} bytes")]
    TooLarge { limit: usize },
    /// A length or a field of the ClientHello is inconsistent.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The client asked for a server name that is not a valid DNS host name.
    #[error("invalid server name: {0}")]
    InvalidServerName(#[from] ServerNameError),
}

impl SniError {
    /// Whether more input could still produce an answer.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, Self::Incomplete { .. })
    }

    /// A short, stable label for metrics and logs (`incomplete`, `not_tls`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Incomplete { .. } => "incomplete",
            Self::NotHandshake { .. } | Self::UnsupportedVersion { .. } => "not_tls",
            Self::NotClientHello { .. } => "not_client_hello",
            Self::TooLarge { .. } => "too_large",
            Self::Malformed(_) => "malformed",
            Self::InvalidServerName(_) => "invalid_server_name",
        }
    }
}

/// Why a requested server name is not a valid host name. The name itself is not kept: it is
/// untrusted input and does not belong in logs verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ServerNameError {
    #[error("the name is empty")]
    Empty,
    #[error("the name is longer than 253 characters")]
    TooLong,
    #[error("the name contains a byte that is not a letter, digit, '-' or '.'")]
    InvalidByte,
    #[error("the name has an empty label")]
    EmptyLabel,
    #[error("a label is longer than 63 characters")]
    LabelTooLong,
    #[error("a label starts or ends with '-'")]
    LabelHyphen,
    #[error("the last label is all digits (an IP address is not a server name)")]
    NumericTopLabel,
}

/// A validated, normalized server name requested by a client: lowercase ASCII letters,
/// digits, `-` and `.`, without a trailing dot. See the module documentation for the rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerName(String);

impl ServerName {
    /// Normalizes and validates the raw `host_name` bytes of a `server_name` extension.
    pub fn parse(raw: &[u8]) -> Result<Self, ServerNameError> {
        let raw = raw.strip_suffix(b".").unwrap_or(raw);
        if raw.is_empty() {
            return Err(ServerNameError::Empty);
        }
        if raw.len() > MAX_SERVER_NAME_LEN {
            return Err(ServerNameError::TooLong);
        }
        if !raw.iter().all(|byte| byte.is_ascii_alphanumeric() || *byte == b'-' || *byte == b'.') {
            return Err(ServerNameError::InvalidByte);
        }
        let mut last_label: &[u8] = &[];
        for label in raw.split(|byte| *byte == b'.') {
            if label.is_empty() {
                return Err(ServerNameError::EmptyLabel);
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(ServerNameError::LabelTooLong);
            }
            if label.starts_with(b"-") || label.ends_with(b"-") {
                return Err(ServerNameError::LabelHyphen);
            }
            last_label = label;
        }
        if last_label.iter().all(u8::is_ascii_digit) {
            return Err(ServerNameError::NumericTopLabel);
        }
        // Every byte was checked to be ASCII above, so this conversion cannot fail; the
        // error arm is kept rather than an unwrap so the function stays total.
        let text = std::str::from_utf8(raw).map_err(|_| ServerNameError::InvalidByte)?;
        Ok(Self(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ServerName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<ServerName> for String {
    fn from(name: ServerName) -> String {
        name.0
    }
}

/// Parses the beginning of a TLS connection.
///
/// Answers `Ok(Some(name))` for a complete ClientHello with a server name, `Ok(None)` for a
/// complete ClientHello without one, [`SniError::Incomplete`] while the input is a valid but
/// unfinished beginning, and another [`SniError`] as soon as the input cannot be the start of
/// an acceptable ClientHello. Looks at no more than [`MAX_CLIENT_HELLO_LEN`] bytes.
pub fn parse_client_hello(input: &[u8]) -> Result<Option<ServerName>, SniError> {
    let message = reassemble_handshake_message(input)?;
    parse_client_hello_body(&message)
}

/// Walks the leading handshake records until their payloads hold one complete handshake
/// message, and returns that message's body (without its 4-byte header).
///
/// The caller parses its whole buffer again after every read, so this walk only reads record
/// headers and the first four payload bytes until the message is complete; payloads are
/// copied once, at the end, and only when the message spans several records. A single record,
/// the common case, is borrowed.
fn reassemble_handshake_message(input: &[u8]) -> Result<Cow<'_, [u8]>, SniError> {
    let mut header = [0u8; HANDSHAKE_HEADER_LEN];
    let mut header_len = 0;
    let mut payload_len = 0;
    let mut records = 0;
    let mut offset = 0;
    loop {
        let record = next_record(input, offset)?;
        for (slot, byte) in header.iter_mut().skip(header_len).zip(record.payload) {
            *slot = *byte;
        }
        header_len = (header_len + record.payload.len()).min(HANDSHAKE_HEADER_LEN);
        payload_len += record.payload.len();

        // The handshake header is checked on whatever part of it has arrived, even in an
        // unfinished record, so that a wrong message type or an impossible length is refused
        // before the caller buffers more.
        if header_len >= 1 && header[0] != HANDSHAKE_TYPE_CLIENT_HELLO {
            return Err(SniError::NotClientHello { handshake_type: header[0] });
        }
        let message_len = if header_len == HANDSHAKE_HEADER_LEN {
            let [_, high, middle, low] = header;
            HANDSHAKE_HEADER_LEN + (usize::from(high) << 16 | usize::from(middle) << 8 | usize::from(low))
        } else {
            0
        };
        // Even unfragmented, a message longer than one record's payload cannot fit in the
        // input bound.
        if message_len > MAX_RECORD_PAYLOAD_LEN {
            return Err(SniError::TooLarge { limit: MAX_CLIENT_HELLO_LEN });
        }
        if record.missing > 0 {
            return Err(SniError::Incomplete { needed: record.missing });
        }
        offset = record.end;
        records += 1;
        if message_len == 0 {
            // The handshake header itself continues in the next record.
            continue;
        }
        if payload_len >= message_len {
            return collect_message_body(input, records, message_len);
        }
        // The rest of the message must come in further records, each with its own header.
        if offset + RECORD_HEADER_LEN + (message_len - payload_len) > MAX_CLIENT_HELLO_LEN {
            return Err(SniError::TooLarge { limit: MAX_CLIENT_HELLO_LEN });
        }
    }
}

/// The body of a handshake message of `message_len` bytes (header included) carried by the
/// first `records` records of `input`, which [`reassemble_handshake_message`] has checked.
/// Whatever follows the message in its last record is dropped.
fn collect_message_body(input: &[u8], records: usize, message_len: usize) -> Result<Cow<'_, [u8]>, SniError> {
    let body = HANDSHAKE_HEADER_LEN..message_len;
    let first = next_record(input, 0)?;
    if records == 1 {
        return first.payload.get(body).map(Cow::Borrowed).ok_or(SniError::Malformed("truncated handshake message"));
    }
    let mut message = Vec::with_capacity(message_len);
    let mut offset = 0;
    for _ in 0..records {
        let record = next_record(input, offset)?;
        message.extend_from_slice(record.payload);
        offset = record.end;
    }
    if message.len() < message_len {
        return Err(SniError::Malformed("truncated handshake message"));
    }
    message.truncate(message_len);
    message.drain(..body.start);
    Ok(Cow::Owned(message))
}

/// One handshake record, as far as it has arrived.
struct Record<'a> {
    /// The part of the payload present in the input.
    payload: &'a [u8],
    /// How many bytes of the payload are still to come (0 when the record is complete).
    missing: usize,
    /// The offset just past the record in the input, once complete.
    end: usize,
}

/// Checks the record header at `offset` and returns as much of the record's payload as the
/// input holds. Header fields are checked as soon as their bytes are present, so garbage is
/// refused after its first byte rather than after a whole record's worth of reads.
fn next_record(input: &[u8], offset: usize) -> Result<Record<'_>, SniError> {
    // A further record needs its header and at least one byte of payload within the bound.
    if offset + RECORD_HEADER_LEN >= MAX_CLIENT_HELLO_LEN {
        return Err(SniError::TooLarge { limit: MAX_CLIENT_HELLO_LEN });
    }
    let available = input.get(offset..).unwrap_or(&[]);
    if let Some(&content_type) = available.first()
        && content_type != CONTENT_TYPE_HANDSHAKE
    {
        return Err(SniError::NotHandshake { content_type });
    }
    if let Some(&major) = available.get(1)
        && major != 3
    {
        return Err(SniError::UnsupportedVersion { major });
    }
    let Some(&[_, _, _, high, low]) = available.get(..RECORD_HEADER_LEN) else {
        return Err(SniError::Incomplete { needed: RECORD_HEADER_LEN - available.len() });
    };
    let payload_len = usize::from(u16::from_be_bytes([high, low]));
    if payload_len == 0 {
        return Err(SniError::Malformed("empty handshake record"));
    }
    if payload_len > MAX_RECORD_PAYLOAD_LEN || offset + RECORD_HEADER_LEN + payload_len > MAX_CLIENT_HELLO_LEN {
        return Err(SniError::TooLarge { limit: MAX_CLIENT_HELLO_LEN });
    }
    let record_len = RECORD_HEADER_LEN + payload_len;
    let present = available.len().min(record_len);
    Ok(Record {
        payload: available.get(RECORD_HEADER_LEN..present).unwrap_or(&[]),
        missing: record_len - present,
        end: offset + record_len,
    })
}

/// Parses a complete ClientHello body (RFC 8446 section 4.1.2, RFC 5246 section 7.4.1.2).
fn parse_client_hello_body(body: &[u8]) -> Result<Option<ServerName>, SniError> {
    let mut reader = Reader::new(body);
    reader.skip(2, "truncated legacy_version")?;
    reader.skip(RANDOM_LEN, "truncated random")?;
    let session_id = reader.vec_u8("truncated legacy_session_id")?;
    if session_id.len() > MAX_SESSION_ID_LEN {
        return Err(SniError::Malformed("legacy_session_id longer than 32 bytes"));
    }
    let cipher_suites = reader.vec_u16("truncated cipher_suites")?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(SniError::Malformed("cipher_suites is empty or of odd length"));
    }
    let compression_methods = reader.vec_u8("truncated legacy_compression_methods")?;
    if compression_methods.is_empty() {
        return Err(SniError::Malformed("no compression method"));
    }
    if reader.is_empty() {
        // TLS 1.2 and earlier allow a hello without an extensions block.
        return Ok(None);
    }
    let extensions = reader.vec_u16("truncated extensions")?;
    if !reader.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }

    let mut extensions = Reader::new(extensions);
    let mut server_name = None;
    let mut seen_server_name = false;
    while !extensions.is_empty() {
        let extension_type = extensions.u16("truncated extension type")?;
        let data = extensions.vec_u16("truncated extension data")?;
        if extension_type != EXTENSION_SERVER_NAME {
            continue;
        }
        // Two server_name extensions would let the edge and the device disagree on the name.
        if seen_server_name {
            return Err(SniError::Malformed("duplicate server_name extension"));
        }
        seen_server_name = true;
        server_name = parse_server_name_extension(data)?;
    }
    Ok(server_name)
}

/// Parses the data of a `server_name` extension (RFC 6066 section 3).
fn parse_server_name_extension(data: &[u8]) -> Result<Option<ServerName>, SniError> {
    let mut reader = Reader::new(data);
    let list = reader.vec_u16("truncated server_name_list")?;
    if !reader.is_empty() {
        return Err(SniError::Malformed("bytes after the server_name_list"));
    }
    if list.is_empty() {
        return Err(SniError::Malformed("empty server_name_list"));
    }
    let mut entries = Reader::new(list);
    let mut host_name = None;
    while !entries.is_empty() {
        let name_type = entries.u8("truncated server name type")?;
        let name = entries.vec_u16("truncated server name")?;
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        if host_name.is_some() {
            return Err(SniError::Malformed("more than one host_name in server_name_list"));
        }
        host_name = Some(name);
    }
    match host_name {
        Some(name) => Ok(Some(ServerName::parse(name)?)),
        None => Ok(None),
    }
}

/// A cursor over untrusted bytes whose every read is bounds-checked and names, on failure,
/// the field that was cut short.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        let Some((taken, rest)) = self.rest.split_at_checked(len) else {
            return Err(SniError::Malformed(what));
        };
        self.rest = rest;
        Ok(taken)
    }

    fn skip(&mut self, len: usize, what: &'static str) -> Result<(), SniError> {
        self.take(len, what).map(|_| ())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        match self.take(1, what)? {
            &[byte] => Ok(byte),
            _ => Err(SniError::Malformed(what)),
        }
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        match self.take(2, what)? {
            &[high, low] => Ok(u16::from_be_bytes([high, low])),
            _ => Err(SniError::Malformed(what)),
        }
    }

    /// A vector with a one-byte length prefix.
    fn vec_u8(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec_u16(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A ClientHello handshake message (header included) with these extensions, or without an
    /// extensions block for `None`.
    fn client_hello_message(extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; RANDOM_LEN]);
        body.push(32);
        body.extend_from_slice(&[9; 32]);
        body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend_from_slice(&[1, 0]);
        if let Some(extensions) = extensions {
            let mut block = Vec::new();
            for (extension_type, data) in extensions {
                block.extend_from_slice(&extension_type.to_be_bytes());
                block.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
                block.extend_from_slice(data);
            }
            body.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
            body.extend_from_slice(&block);
        }
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut message = vec![HANDSHAKE_TYPE_CLIENT_HELLO, len[1], len[2], len[3]];
        message.extend_from_slice(&body);
        message
    }

    /// Wraps a handshake message in records carrying at most `fragment` bytes each.
    fn records(message: &[u8], fragment: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in message.chunks(fragment) {
            out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// The data of a `server_name` extension listing these (name type, name) entries.
    fn server_name_data(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        data
    }

    fn hello_for(name: &[u8]) -> Vec<u8> {
        records(&client_hello_message(Some(&[(EXTENSION_SERVER_NAME, server_name_data(&[(0, name)]))])), 1 << 14)
    }

    fn name(text: &str) -> Option<ServerName> {
        Some(ServerName::parse(text.as_bytes()).unwrap())
    }

    #[test]
    fn reads_the_server_name() {
        let hello = hello_for(b"app.example.test");
        assert_eq!(parse_client_hello(&hello), Ok(name("app.example.test")));
        assert_eq!(parse_client_hello(&hello).unwrap().unwrap().as_str(), "app.example.test");
    }

    #[test]
    fn every_prefix_is_incomplete_and_needed_is_a_lower_bound() {
        let hello = hello_for(b"app.example.test");
        for len in 0..hello.len() {
            match parse_client_hello(&hello[..len]) {
                Err(SniError::Incomplete { needed }) => {
                    assert!(needed >= 1 && len + needed <= hello.len(), "prefix {len}: needed {needed}")
                }
                other => panic!("prefix of {len} bytes: {other:?}"),
            }
        }
        assert_eq!(parse_client_hello(&[]), Err(SniError::Incomplete { needed: 5 }));
        assert_eq!(parse_client_hello(&hello[..3]), Err(SniError::Incomplete { needed: 2 }));
        assert_eq!(parse_client_hello(&hello[..5]), Err(SniError::Incomplete { needed: hello.len() - 5 }));
    }

    #[test]
    fn hellos_without_server_name() {
        assert_eq!(parse_client_hello(&records(&client_hello_message(None), 1 << 14)), Ok(None));
        assert_eq!(parse_client_hello(&records(&client_hello_message(Some(&[])), 1 << 14)), Ok(None));
        let other_extension = [(0x002b, vec![2, 3, 4])];
        assert_eq!(parse_client_hello(&records(&client_hello_message(Some(&other_extension)), 1 << 14)), Ok(None));
    }

    #[test]
    fn bytes_after_the_hello_are_ignored() {
        let mut hello = hello_for(b"app.example.test");
        // A TLS 1.3 middlebox-compatibility change_cipher_spec record.
        hello.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        assert_eq!(parse_client_hello(&hello), Ok(name("app.example.test")));
    }

    #[test]
    fn fragmented_hellos_are_reassembled() {
        let message =
            client_hello_message(Some(&[(EXTENSION_SERVER_NAME, server_name_data(&[(0, b"frag.example.test")]))]));
        for fragment in [1, 2, 3, 4, 5, 17, message.len() - 1] {
            let hello = records(&message, fragment);
            assert_eq!(parse_client_hello(&hello), Ok(name("frag.example.test")), "fragment {fragment}");
            for len in 0..hello.len() {
                assert!(parse_client_hello(&hello[..len]).unwrap_err().is_incomplete(), "{fragment}/{len}");
            }
        }
    }

    #[test]
    fn another_record_type_between_fragments_is_refused() {
        let message = client_hello_message(None);
        let (first, second) = message.split_at(10);
        let mut hello = records(first, 1 << 14);
        hello.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        hello.extend_from_slice(&records(second, 1 << 14));
        assert_eq!(parse_client_hello(&hello), Err(SniError::NotHandshake { content_type: 23 }));
    }

    #[test]
    fn garbage_is_refused_at_its_first_byte() {
        assert_eq!(parse_client_hello(b"G"), Err(SniError::NotHandshake { content_type: b'G' }));
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Err(SniError::NotHandshake { content_type: b'G' }));
        // An SSLv2-compatible hello starts with the high bit of a two-byte length.
        assert_eq!(parse_client_hello(&[0x80, 0x2e, 1]), Err(SniError::NotHandshake { content_type: 0x80 }));
        assert_eq!(parse_client_hello(&[22, 2]), Err(SniError::UnsupportedVersion { major: 2 }));
        assert_eq!(parse_client_hello(&[22, 4, 1]), Err(SniError::UnsupportedVersion { major: 4 }));
        assert_eq!(parse_client_hello(&[22, 3, 1, 0, 0]), Err(SniError::Malformed("empty handshake record")));
        assert_eq!(parse_client_hello(&[22, 3, 1, 0, 4, 2]), Err(SniError::NotClientHello { handshake_type: 2 }));
    }

    #[test]
    fn sizes_are_bounded() {
        let limit = SniError::TooLarge { limit: MAX_CLIENT_HELLO_LEN };
        // A record longer than TLS allows is refused from its header alone.
        assert_eq!(parse_client_hello(&[22, 3, 1, 0x40, 0x01]), Err(limit.clone()));
        // So is a handshake message that cannot fit in one record's payload.
        assert_eq!(parse_client_hello(&[22, 3, 1, 0x40, 0x00, 1, 0, 0x3f, 0xfd]), Err(limit.clone()));
        assert!(parse_client_hello(&[22, 3, 1, 0x40, 0x00, 1, 0, 0x3f, 0xfc]).unwrap_err().is_incomplete());

        // A hello of exactly the bound parses; padding makes it so.
        let base =
            client_hello_message(Some(&[(EXTENSION_SERVER_NAME, server_name_data(&[(0, b"big.example.test")]))]));
        let padding = MAX_RECORD_PAYLOAD_LEN - base.len() - 4;
        let message = client_hello_message(Some(&[
            (EXTENSION_SERVER_NAME, server_name_data(&[(0, b"big.example.test")])),
            (21, vec![0; padding]),
        ]));
        assert_eq!(message.len(), MAX_RECORD_PAYLOAD_LEN);
        let hello = records(&message, MAX_RECORD_PAYLOAD_LEN);
        assert_eq!(hello.len(), MAX_CLIENT_HELLO_LEN);
        assert_eq!(parse_client_hello(&hello), Ok(name("big.example.test")));

        // The same hello in two records needs one more header than the bound allows: refused
        // as soon as the first record is read, before the rest is buffered.
        let split = records(&message, MAX_RECORD_PAYLOAD_LEN - 100);
        assert_eq!(parse_client_hello(&split[..MAX_RECORD_PAYLOAD_LEN - 95]), Err(limit.clone()));
        assert_eq!(parse_client_hello(&split), Err(limit.clone()));

        // Fragmented into tiny records, even a small hello runs out of room for headers.
        let small = client_hello_message(Some(&[(21, vec![0; 3000])]));
        assert_eq!(parse_client_hello(&records(&small, 1)), Err(limit));
        assert_eq!(parse_client_hello(&records(&small, 1000)), Ok(None));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let mut message = client_hello_message(Some(&[]));
        // Cut the body after the compression methods plus one byte: a truncated extensions
        // length.
        let body_len = message.len() - 4 - 1;
        message.truncate(message.len() - 1);
        message[1..4].copy_from_slice(&u32::try_from(body_len).unwrap().to_be_bytes()[1..]);
        assert_eq!(parse_client_hello(&records(&message, 1 << 14)), Err(SniError::Malformed("truncated extensions")));

        let mut message = client_hello_message(Some(&[]));
        message.push(0);
        let body_len = message.len() - 4;
        message[1..4].copy_from_slice(&u32::try_from(body_len).unwrap().to_be_bytes()[1..]);
        assert_eq!(
            parse_client_hello(&records(&message, 1 << 14)),
            Err(SniError::Malformed("bytes after the extensions"))
        );

        let mut message = client_hello_message(None);
        message[4 + 2 + RANDOM_LEN] = 33;
        assert!(matches!(parse_client_hello(&records(&message, 1 << 14)), Err(SniError::Malformed(_))));

        // A handshake message shorter than the fixed fields.
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0, 6, 1, 0, 0, 2, 3, 3]),
            Err(SniError::Malformed("truncated random"))
        );
    }

    #[test]
    fn cipher_suites_and_compression_are_checked() {
        let base = client_hello_message(None);
        let cipher_suites_at = 4 + 2 + RANDOM_LEN + 1 + 32;
        let mut odd = base.clone();
        odd[cipher_suites_at + 1] = 3;
        assert!(matches!(parse_client_hello(&records(&odd, 1 << 14)), Err(SniError::Malformed(_))));
        let mut no_compression = base.clone();
        no_compression[cipher_suites_at + 2 + 4] = 0;
        assert!(matches!(parse_client_hello(&records(&no_compression, 1 << 14)), Err(SniError::Malformed(_))));
    }

    #[test]
    fn server_name_extension_rules() {
        let parse = |extensions: &[(u16, Vec<u8>)]| {
            parse_client_hello(&records(&client_hello_message(Some(extensions)), 1 << 14))
        };
        let sni = |entries: &[(u8, &[u8])]| (EXTENSION_SERVER_NAME, server_name_data(entries));

        assert_eq!(
            parse(&[sni(&[(0, b"a.example.test")]), sni(&[(0, b"b.example.test")])]),
            Err(SniError::Malformed("duplicate server_name extension"))
        );
        assert_eq!(
            parse(&[sni(&[(0, b"a.example.test"), (0, b"b.example.test")])]),
            Err(SniError::Malformed("more than one host_name in server_name_list"))
        );
        assert_eq!(parse(&[sni(&[(7, b"opaque"), (0, b"a.example.test")])]), Ok(name("a.example.test")));
        assert_eq!(parse(&[sni(&[(7, b"opaque")])]), Ok(None));
        assert_eq!(parse(&[sni(&[])]), Err(SniError::Malformed("empty server_name_list")));
        assert_eq!(parse(&[(EXTENSION_SERVER_NAME, vec![])]), Err(SniError::Malformed("truncated server_name_list")));
        assert_eq!(parse(&[sni(&[(0, b"")])]), Err(SniError::InvalidServerName(ServerNameError::Empty)));
        assert_eq!(
            parse(&[sni(&[(0, b"a\0.example.test")])]),
            Err(SniError::InvalidServerName(ServerNameError::InvalidByte))
        );
        let mut trailing = server_name_data(&[(0, b"a.example.test")]);
        trailing.push(0);
        assert_eq!(
            parse(&[(EXTENSION_SERVER_NAME, trailing)]),
            Err(SniError::Malformed("bytes after the server_name_list"))
        );
        // A list whose entry claims more bytes than the list holds.
        assert_eq!(
            parse(&[(EXTENSION_SERVER_NAME, vec![0, 4, 0, 0, 9, b'a'])]),
            Err(SniError::Malformed("truncated server name"))
        );
    }

    #[test]
    fn server_names_are_normalized_and_validated() {
        let good = [
            ("app.example.test", "app.example.test"),
            ("APP.Example.TEST", "app.example.test"),
            ("app.example.test.", "app.example.test"),
            ("localhost", "localhost"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("a-b.0.example.test", "a-b.0.example.test"),
            ("1.2.3.example", "1.2.3.example"),
        ];
        for (raw, normalized) in good {
            assert_eq!(ServerName::parse(raw.as_bytes()).unwrap().as_str(), normalized, "{raw}");
        }
        let long_label = format!("{}.test", "a".repeat(64));
        let long_name = format!("{}.test", ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(57)].join("."));
        assert_eq!(long_name.len(), 254);
        let longest = &long_name[1..];
        assert!(ServerName::parse(longest.as_bytes()).is_ok());
        assert!(ServerName::parse(format!("{longest}.").as_bytes()).is_ok());
        let bad: [(&[u8], ServerNameError); 17] = [
            (b"", ServerNameError::Empty),
            (b".", ServerNameError::Empty),
            (b"..", ServerNameError::EmptyLabel),
            (b"app.example.test..", ServerNameError::EmptyLabel),
            (b".app.example.test", ServerNameError::EmptyLabel),
            (b"app..example.test", ServerNameError::EmptyLabel),
            (b"app\0.example.test", ServerNameError::InvalidByte),
            (b"app_1.example.test", ServerNameError::InvalidByte),
            (b"*.example.test", ServerNameError::InvalidByte),
            (b"b\xc3\xbccher.example", ServerNameError::InvalidByte),
            (b"[::1]", ServerNameError::InvalidByte),
            (b"app example.test", ServerNameError::InvalidByte),
            (b"-app.example.test", ServerNameError::LabelHyphen),
            (b"app-.example.test", ServerNameError::LabelHyphen),
            (b"192.0.2.1", ServerNameError::NumericTopLabel),
            (long_label.as_bytes(), ServerNameError::LabelTooLong),
            (long_name.as_bytes(), ServerNameError::TooLong),
        ];
        for (raw, error) in bad {
            assert_eq!(ServerName::parse(raw), Err(error), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn reasons_are_stable_labels() {
        assert_eq!(SniError::Incomplete { needed: 1 }.reason(), "incomplete");
        assert_eq!(SniError::NotHandshake { content_type: 0 }.reason(), "not_tls");
        assert_eq!(SniError::InvalidServerName(ServerNameError::Empty).reason(), "invalid_server_name");
        assert_eq!(
            SniError::Incomplete { needed: 3 }.to_string(),
            "the ClientHello is incomplete: at least 3 more bytes are needed"
        );
    }
}
