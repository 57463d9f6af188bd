//! A reader for the tar archives the Docker engine exports (`GET /containers/{id}/export`):
//! ustar headers with their `prefix`, GNU long names (`L`, `K`) and PAX extended headers
//! (`x`; `g` is skipped). Pure, bounded by the input: every size is checked against what is
//! left. Device nodes and FIFOs are skipped (the guest mounts devtmpfs).

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarEntry {
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Directory {
        path: String,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// A hard link to an earlier file of the archive.
    Hardlink {
        path: String,
        target: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TarError {
    #[error("tar header at byte {offset}: {reason}")]
    Header { offset: usize, reason: &'static str },
    #[error("tar entry at byte {offset} says {size} bytes, past the end of the archive")]
    Truncated { offset: usize, size: usize },
}

const BLOCK: usize = 512;

/// Every entry of `bytes`, in order, with paths relative (no leading `/` or `./`).
pub fn entries(bytes: &[u8]) -> Result<Vec<TarEntry>, TarError> {
    let mut entries = Vec::new();
    let mut offset = 0;
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    let mut pax: BTreeMap<String, String> = BTreeMap::new();
    while offset + BLOCK <= bytes.len() {
        let header = &bytes[offset..offset + BLOCK];
        if header.iter().all(|byte| *byte == 0) {
            break;
        }
        let size = octal(&header[124..136]).ok_or(TarError::Header { offset, reason: "bad size" })?;
        let size = usize::try_from(size).map_err(|_| TarError::Header { offset, reason: "size too large" })?;
        let data_start = offset + BLOCK;
        let data_end = data_start.checked_add(size).filter(|end| *end <= bytes.len());
        let Some(data_end) = data_end else {
            return Err(TarError::Truncated { offset, size });
        };
        let data = &bytes[data_start..data_end];
        let kind = header[156];
        let mode = octal(&header[100..108]).unwrap_or(0o644) as u32 & 0o7777;
        let next = data_start + size.div_ceil(BLOCK) * BLOCK;
        match kind {
            b'L' => long_name = Some(text(data)),
            b'K' => long_link = Some(text(data)),
            b'x' => pax = parse_pax(data).ok_or(TarError::Header { offset, reason: "bad PAX header" })?,
            b'g' => {}
            _ => {
                let mut name = text(&header[0..100]);
                let is_ustar = &header[257..262] == b"ustar";
                if is_ustar {
                    let prefix = text(&header[345..500]);
                    if !prefix.is_empty() {
                        name = format!("{prefix}/{name}");
                    }
                }
                let name = pax.remove("path").or(long_name.take()).unwrap_or(name);
                let link = pax.remove("linkpath").or(long_link.take()).unwrap_or_else(|| text(&header[157..257]));
                pax.clear();
                let path = clean(&name);
                if !path.is_empty() {
                    match kind {
                        b'0' | 0 | b'7' => entries.push(TarEntry::File { path, mode, data: data.to_vec() }),
                        b'5' => entries.push(TarEntry::Directory { path, mode }),
                        b'2' => entries.push(TarEntry::Symlink { path, target: link }),
                        b'1' => entries.push(TarEntry::Hardlink { path, target: clean(&link) }),
                        // Devices, FIFOs and unknown kinds have no place in the guest's image.
                        _ => {}
                    }
                }
            }
        }
        offset = next;
    }
    Ok(entries)
}

fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|byte| *byte == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn octal(bytes: &[u8]) -> Option<u64> {
    let text = text(bytes);
    let text = text.trim_matches(|c: char| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// `LEN key=value\n` records.
fn parse_pax(mut data: &[u8]) -> Option<BTreeMap<String, String>> {
    let mut records = BTreeMap::new();
    while !data.is_empty() {
        let space = data.iter().position(|byte| *byte == b' ')?;
        let length: usize = std::str::from_utf8(&data[..space]).ok()?.parse().ok()?;
        if length <= space + 1 || length > data.len() {
            return None;
        }
        let record = std::str::from_utf8(&data[space + 1..length]).ok()?.trim_end_matches('\n');
        let (key, value) = record.split_once('=')?;
        records.insert(key.to_owned(), value.to_owned());
        data = &data[length..];
    }
    Some(records)
}

/// A relative path without `./`, `/` or empty components.
fn clean(path: &str) -> String {
    path.split('/').filter(|part| !part.is_empty() && *part != ".").collect::<Vec<_>>().join("/")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ustar header block for `name`.
    pub(crate) fn header(name: &str, kind: u8, size: usize, link: &str) -> Vec<u8> {
        let mut block = vec![0u8; BLOCK];
        block[..name.len()].copy_from_slice(name.as_bytes());
        block[100..107].copy_from_slice(b"0000755");
        block[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        block[156] = kind;
        block[157..157 + link.len()].copy_from_slice(link.as_bytes());
        block[257..263].copy_from_slice(b"ustar\0");
        block
    }

    pub(crate) fn entry(name: &str, kind: u8, data: &[u8], link: &str) -> Vec<u8> {
        let mut bytes = header(name, kind, data.len(), link);
        bytes.extend_from_slice(data);
        bytes.resize(bytes.len().next_multiple_of(BLOCK), 0);
        bytes
    }

    #[test]
    fn files_directories_links_and_long_names_are_read() {
        let long = format!("usr/share/{}/file", "x".repeat(120));
        let pax_record = format!("path={long}\n");
        let pax = format!("{} {pax_record}", pax_record.len() + 4);
        assert_eq!(pax.len(), pax_record.len() + 4, "a 3-digit length");
        let mut bytes = Vec::new();
        bytes.extend(entry("./", b'5', b"", ""));
        bytes.extend(entry("./bin/", b'5', b"", ""));
        bytes.extend(entry("./bin/app", b'0', b"hello", ""));
        bytes.extend(entry("./bin/sh", b'2', b"", "app"));
        bytes.extend(entry("./bin/hard", b'1', b"", "./bin/app"));
        bytes.extend(entry("PaxHeaders/x", b'x', pax.as_bytes(), ""));
        bytes.extend(entry("ignored-short-name", b'0', b"long", ""));
        bytes.extend(entry("dev/null", b'3', b"", ""));
        bytes.extend(vec![0u8; 2 * BLOCK]);
        assert_eq!(
            entries(&bytes).unwrap(),
            [
                TarEntry::Directory { path: "bin".into(), mode: 0o755 },
                TarEntry::File { path: "bin/app".into(), mode: 0o755, data: b"hello".to_vec() },
                TarEntry::Symlink { path: "bin/sh".into(), target: "app".into() },
                TarEntry::Hardlink { path: "bin/hard".into(), target: "bin/app".into() },
                TarEntry::File { path: long, mode: 0o755, data: b"long".to_vec() },
            ]
        );
    }

    #[test]
    fn a_truncated_archive_is_an_error() {
        let mut bytes = header("big", b'0', 4096, "");
        bytes.extend(vec![1u8; 100]);
        assert_eq!(entries(&bytes), Err(TarError::Truncated { offset: 0, size: 4096 }));
        let mut bad = header("x", b'0', 0, "");
        bad[124..128].copy_from_slice(b"zzzz");
        assert!(matches!(entries(&bad), Err(TarError::Header { .. })));
    }
}
