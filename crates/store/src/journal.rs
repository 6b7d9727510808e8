//! One segment of the audit journal, appended to through a shared memory mapping.
//!
//! An append is a copy into the mapping: no system call per event (a `write` per command and
//! per result was a tenth of the gateway's CPU). The bytes are in the kernel's page cache as soon
//! as they are copied, exactly as after a `write`, so they survive a crash of the process; an
//! `fsync` of the file makes them durable, mapping included.
//!
//! The file grows in `CHUNK` steps, each allocated on disk first (`posix_fallocate`), so a
//! full disk fails the append that needs the space (and the caller refuses its command) rather
//! than a later page fault. Until a segment is closed its file ends with unwritten zero bytes
//! after the last line; [`Segment::close`] cuts them off, and a reader of a segment left by a
//! crash skips them (see [`trim_zeros`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// How much the file grows at a time.
const CHUNK: usize = 1 << 20;

pub(crate) struct Segment {
    file: Arc<File>,
    /// The mapping of the file's first `cap` bytes (null while `cap` is 0).
    map: *mut u8,
    cap: usize,
    /// Bytes appended so far.
    len: usize,
    /// Tests: the disk is full beyond this many bytes.
    #[cfg(test)]
    pub(crate) room: Option<usize>,
}

// SAFETY: the mapping is owned by the segment and only touched through `&mut self`.
unsafe impl Send for Segment {}

impl Segment {
    /// Creates (or empties) the segment at `path`, private to this user (mode 0600).
    pub(crate) fn create(path: &Path) -> io::Result<Segment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(Segment {
            file: Arc::new(file),
            map: std::ptr::null_mut(),
            cap: 0,
            len: 0,
            #[cfg(test)]
            room: None,
        })
    }

    /// The file, for fsyncs (which cover what was written through the mapping).
    pub(crate) fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub(crate) fn len(&self) -> u64 {
        self.len as u64
    }

    /// Appends `bytes` whole, or fails without changing what the segment holds.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            // Nothing to copy (and no mapping yet, perhaps: a null pointer is never copied to).
            return Ok(());
        }
        let end = self
            .len
            .checked_add(bytes.len())
            .ok_or_else(|| io::Error::other("audit journal segment too large"))?;
        if end > self.cap {
            self.grow(end)?;
        }
        // SAFETY: `len..end` lies within the mapping (`end <= cap`), which nothing else aliases.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.map.add(self.len), bytes.len());
        }
        self.len = end;
        Ok(())
    }

    /// Makes the file and the mapping at least `need` bytes long (rounded up to `CHUNK`).
    fn grow(&mut self, need: usize) -> io::Result<()> {
        let cap = need.div_ceil(CHUNK) * CHUNK;
        #[cfg(test)]
        if self.room.is_some_and(|room| cap > room) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let fd = self.file.as_raw_fd();
        let len = libc::off_t::try_from(cap)
            .map_err(|_| io::Error::other("audit journal segment too large"))?;
        // SAFETY: plain system calls on a file descriptor we own.
        let err = unsafe { libc::posix_fallocate(fd, 0, len) };
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
        let map = if self.map.is_null() {
            // SAFETY: a fresh shared mapping of `cap` bytes of a file at least that long.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    cap,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            }
        } else {
            // SAFETY: grows our own mapping; it may move, and no pointer into it outlives this.
            unsafe { libc::mremap(self.map.cast(), self.cap, cap, libc::MREMAP_MAYMOVE) }
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.map = map.cast();
        self.cap = cap;
        Ok(())
    }

    /// Unmaps the segment and cuts the file to what was appended: the form a sealed segment,
    /// or one left by a clean stop, has on disk.
    pub(crate) fn close(mut self) -> io::Result<()> {
        self.unmap();
        self.file.set_len(self.len as u64)
    }

    fn unmap(&mut self) {
        if !self.map.is_null() {
            // SAFETY: our own mapping, not used after this.
            unsafe { libc::munmap(self.map.cast(), self.cap) };
            self.map = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if !self.map.is_null() {
            self.unmap();
            let _ = self.file.set_len(self.len as u64);
        }
    }
}

/// A piece of a journal segment without zero bytes at either end: those a crashed writer left
/// after its last line, or a page a power loss never wrote (a line is JSON: never a zero byte).
pub(crate) fn trim_zeros(bytes: &[u8]) -> &[u8] {
    let Some(start) = bytes.iter().position(|&b| b != 0) else {
        return &[];
    };
    let end = bytes.iter().rposition(|&b| b != 0).map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_land_in_the_file_and_close_cuts_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut seg = Segment::create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        seg.append(b"one\n").unwrap();
        // Visible to a reader of the file at once (a crash loses nothing appended).
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), CHUNK);
        assert_eq!(trim_zeros(&on_disk), b"one\n");
        // Across a growth of the mapping.
        let big = vec![b'x'; CHUNK + 10];
        seg.append(&big).unwrap();
        seg.append(b"\ntwo\n").unwrap();
        assert_eq!(seg.len(), (4 + CHUNK + 10 + 5) as u64);
        seg.file().sync_data().unwrap();
        seg.close().unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), 4 + CHUNK + 10 + 5);
        assert!(on_disk.starts_with(b"one\nxxx") && on_disk.ends_with(b"x\ntwo\n"));
    }

    #[test]
    fn a_dropped_segment_is_cut_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut seg = Segment::create(&path).unwrap();
        seg.append(b"a\n").unwrap();
        drop(seg);
        assert_eq!(std::fs::read(&path).unwrap(), b"a\n");
        assert_eq!(trim_zeros(b"\0\0"), b"");
        assert_eq!(trim_zeros(b"\0x\0y\0"), b"x\0y");
    }
}
