//! A writer for the `newc` cpio format (the one the Linux kernel unpacks as an initramfs).
//!
//! Pure: entries go into a byte vector. The host has no `cpio` binary, and building the archive
//! here keeps its content (and so its cache key) byte-for-byte reproducible: every entry has
//! mtime 0, uid and gid 0, and inode numbers in the order entries were added.

use std::collections::BTreeSet;

/// The kinds of entry an initramfs needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Directory {
        mode: u32,
    },
    File {
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        target: String,
    },
    /// A character device node (`/dev/console` must exist before devtmpfs is mounted).
    CharDevice {
        mode: u32,
        major: u32,
        minor: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    #[error("archive path {0:?} is empty, absolute, or has `.`/`..` components")]
    BadPath(String),
    #[error("archive entry {path:?} is {size} bytes, more than newc's 4 GiB")]
    TooLarge { path: String, size: usize },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const TRAILER: &str = "TRAILER!!!";

/// An archive being written. Parent directories are added on demand (mode 0755), once.
#[derive(Debug, Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_inode: u32,
    directories: BTreeSet<String>,
}

impl Archive {
    pub fn new() -> Self {
        Self { bytes: Vec::new(), next_inode: 1, directories: BTreeSet::new() }
    }

    /// Adds `entry` at `path` (relative, `bin/busybox`), creating missing parents first.
    pub fn add(&mut self, path: &str, entry: Entry) -> Result<(), CpioError> {
        if path.is_empty()
            || path.starts_with('/')
            || path.split('/').any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(CpioError::BadPath(path.to_owned()));
        }
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !self.directories.contains(&parent) {
                let directory = parent.clone();
                self.write(&directory, S_IFDIR | 0o755, &[], (0, 0))?;
                self.directories.insert(directory);
            }
        }
        match entry {
            Entry::Directory { mode } => {
                if self.directories.insert(path.to_owned()) {
                    self.write(path, S_IFDIR | (mode & 0o7777), &[], (0, 0))?;
                }
                Ok(())
            }
            Entry::File { mode, data } => self.write(path, S_IFREG | (mode & 0o7777), &data, (0, 0)),
            Entry::Symlink { target } => self.write(path, S_IFLNK | 0o777, target.as_bytes(), (0, 0)),
            Entry::CharDevice { mode, major, minor } => {
                self.write(path, S_IFCHR | (mode & 0o7777), &[], (major, minor))
            }
        }
    }

    /// Ends the archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        // The trailer has no data and a fixed short name: it cannot fail.
        let _ = self.write_header(TRAILER, 0, 0, 0, (0, 0), 1);
        self.bytes
    }

    fn write(&mut self, path: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> Result<(), CpioError> {
        let size =
            u32::try_from(data.len()).map_err(|_| CpioError::TooLarge { path: path.to_owned(), size: data.len() })?;
        let inode = self.next_inode;
        self.next_inode += 1;
        let links = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        self.write_header(path, inode, mode, size, rdev, links)?;
        self.bytes.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    fn write_header(
        &mut self,
        path: &str,
        inode: u32,
        mode: u32,
        size: u32,
        rdev: (u32, u32),
        links: u32,
    ) -> Result<(), CpioError> {
        let name_size = u32::try_from(path.len() + 1).map_err(|_| CpioError::BadPath(path.to_owned()))?;
        let fields = [inode, mode, 0, 0, links, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(path.as_bytes());
        self.bytes.push(0);
        self.pad();
        Ok(())
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back (name, mode, size, rdev major, data) of every entry, as the kernel would.
    fn parse(bytes: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(&bytes[at..at + 6], b"070701", "magic at {at}");
            let field = |index: usize| {
                let start = at + 6 + index * 8;
                u32::from_str_radix(std::str::from_utf8(&bytes[start..start + 8]).unwrap(), 16).unwrap()
            };
            let (mode, size, major, name_size) = (field(1), field(6), field(9), field(11));
            let name_start = at + 110;
            let name = std::str::from_utf8(&bytes[name_start..name_start + name_size as usize - 1]).unwrap().to_owned();
            assert_eq!(bytes[name_start + name_size as usize - 1], 0);
            let data_start = (name_start + name_size as usize).next_multiple_of(4);
            let data = bytes[data_start..data_start + size as usize].to_vec();
            at = (data_start + size as usize).next_multiple_of(4);
            if name == TRAILER {
                assert_eq!(at, bytes.len());
                return entries;
            }
            entries.push((name, mode, size, major, data));
        }
    }

    #[test]
    fn entries_round_trip_with_parents_once_and_alignment() {
        let mut archive = Archive::new();
        archive.add("bin/busybox", Entry::File { mode: 0o755, data: b"abcde".to_vec() }).unwrap();
        archive.add("bin/sh", Entry::Symlink { target: "busybox".into() }).unwrap();
        archive.add("dev/console", Entry::CharDevice { mode: 0o600, major: 5, minor: 1 }).unwrap();
        archive.add("bin", Entry::Directory { mode: 0o755 }).unwrap();
        let bytes = archive.finish();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|entry| entry.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/busybox", "bin/sh", "dev", "dev/console"]);
        assert_eq!(entries[0].1, 0o040755);
        assert_eq!((entries[1].1, entries[1].4.as_slice()), (0o100755, &b"abcde"[..]));
        assert_eq!((entries[2].1, entries[2].4.as_slice()), (0o120777, &b"busybox"[..]));
        assert_eq!((entries[4].1, entries[4].3), (0o020600, 5));
    }

    #[test]
    fn the_same_entries_give_the_same_bytes() {
        let build = || {
            let mut archive = Archive::new();
            archive.add("etc/a", Entry::File { mode: 0o644, data: vec![1, 2, 3] }).unwrap();
            archive.finish()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn unsafe_paths_are_refused() {
        let mut archive = Archive::new();
        for path in ["", "/etc/passwd", "a/../b", "a//b", "./a"] {
            assert_eq!(
                archive.add(path, Entry::Directory { mode: 0o755 }),
                Err(CpioError::BadPath(path.to_owned())),
                "{path:?}"
            );
        }
    }
}
