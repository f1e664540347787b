//! Checks that a VM-state stream from QEMU is whole before its snapshot is
//! taken. QEMU's migration stream has no length up front, and one that
//! stops early (QEMU failed, a migration was cancelled, QEMU was killed)
//! ends like a whole one, so without this check the VM-state disk could
//! keep a snapshot whose VM state is cut short but looks complete.
//!
//! What QEMU 7.2 writes (migration/savevm.c): the magic `QEVM` and version
//! 3 (big-endian 32-bit each), the sections, then `QEMU_VM_EOF` (0x00) and,
//! for a pre-copy stream on a machine that does not suppress it, one
//! `QEMU_VM_VMDESCRIPTION` (0x06): a big-endian 32-bit length and that
//! many bytes of JSON. The sections carry no lengths, so the end is found
//! from the back: the stream is whole when its last bytes are
//! `00 06 LEN` followed by exactly `LEN` bytes of one JSON object.
//! [`Checked`] wraps the reader and turns the end of a stream that is not
//! whole into a read error, which makes the save fail and roll back.

use std::collections::VecDeque;
use std::io::{self, Read};

/// QEMU's stream magic, then version 3.
const HEADER: [u8; 8] = *b"QEVM\0\0\0\x03";
/// The longest VM description searched for at the end (QEMU's for a
/// q35 guest with a few devices is tens of KiB).
const TAIL: usize = 2 << 20;
const EOF: u8 = 0x00;
const VMDESCRIPTION: u8 = 0x06;

/// A reader of a VM-state stream that fails at its end unless the stream
/// is whole (see the module documentation).
pub struct Checked<R> {
    inner: R,
    head: Vec<u8>,
    tail: VecDeque<u8>,
}

impl<R: Read> Checked<R> {
    /// Wraps `inner`, a VM-state stream from QEMU.
    pub fn new(inner: R) -> Self {
        Checked {
            inner,
            head: Vec::with_capacity(HEADER.len()),
            tail: VecDeque::new(),
        }
    }

    fn keep(&mut self, data: &[u8]) -> io::Result<()> {
        if self.head.len() < HEADER.len() {
            let n = (HEADER.len() - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
            if !HEADER.starts_with(&self.head) {
                return Err(invalid(
                    "the VM state stream does not start with QEMU's magic and version 3 (QEVM, 3)".into(),
                ));
            }
        }
        let data = &data[data.len().saturating_sub(TAIL)..];
        let over = (self.tail.len() + data.len()).saturating_sub(TAIL);
        self.tail.drain(..over);
        self.tail.extend(data);
        Ok(())
    }

    fn check_end(&mut self) -> io::Result<()> {
        if self.head.len() < HEADER.len() {
            return Err(invalid(format!(
                "the VM state stream ended after {} bytes, before QEMU's header",
                self.head.len()
            )));
        }
        let tail = self.tail.make_contiguous();
        if whole(tail) {
            return Ok(());
        }
        Err(invalid(
            "the VM state stream did not end with QEMU's end-of-stream mark and VM description: \
             it was cut short (QEMU failed, was cancelled or killed), or QEMU runs with \
             suppress-vmdesc=on, which Spindle does not accept"
                .into(),
        ))
    }
}

/// Whether `tail`, the last bytes of a stream, ends with `00 06 LEN` and
/// `LEN` bytes of a JSON object.
fn whole(tail: &[u8]) -> bool {
    if tail.last() != Some(&b'}') {
        return false;
    }
    // The description's start is searched from the back: the first
    // candidate whose length reaches exactly to the end.
    let end = tail.len();
    (0..end.saturating_sub(6)).rev().any(|p| {
        tail[p] == EOF
            && tail[p + 1] == VMDESCRIPTION
            && u32::from_be_bytes([tail[p + 2], tail[p + 3], tail[p + 4], tail[p + 5]]) as usize == end - p - 6
            && tail.get(p + 6) == Some(&b'{')
    })
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.check_end()?;
            return Ok(0);
        }
        self.keep(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream as QEMU writes it: header, `body`, EOF and a description.
    fn stream(body: &[u8], desc: &str) -> Vec<u8> {
        let mut s = HEADER.to_vec();
        s.extend_from_slice(body);
        s.push(EOF);
        s.push(VMDESCRIPTION);
        s.extend_from_slice(&(desc.len() as u32).to_be_bytes());
        s.extend_from_slice(desc.as_bytes());
        s
    }

    /// Reads `data` through [`Checked`] in reads of `chunk` bytes.
    fn read_all(data: &[u8], chunk: usize) -> io::Result<Vec<u8>> {
        struct Chunks<'a>(&'a [u8], usize);
        impl Read for Chunks<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(self.1).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut out = Vec::new();
        Checked::new(Chunks(data, chunk)).read_to_end(&mut out)?;
        Ok(out)
    }

    const DESC: &str = r#"{"page_size":4096,"devices":[{"name":"timer","instance_id":0}]}"#;

    #[test]
    fn a_whole_stream_reads_through_unchanged_in_any_chunking() {
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let s = stream(&body, DESC);
        for chunk in [1, 7, 4096, 1 << 20] {
            assert_eq!(read_all(&s, chunk).unwrap(), s, "chunk {chunk}");
        }
    }

    #[test]
    fn a_stream_cut_anywhere_fails_at_its_end() {
        let body = vec![0u8; 5000];
        let s = stream(&body, DESC);
        for cut in [0, 3, 8, 100, 5008, 5009, 5010, 5013, s.len() - 1] {
            let e = read_all(&s[..cut], 512).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "cut at {cut}");
            assert!(e.to_string().contains("VM state stream"), "cut at {cut}: {e}");
        }
    }

    #[test]
    fn a_stream_without_the_description_or_with_a_wrong_length_is_refused() {
        let mut s = HEADER.to_vec();
        s.extend_from_slice(&[1, 2, 3, EOF]);
        assert!(read_all(&s, 64).unwrap_err().to_string().contains("suppress-vmdesc"));
        let mut s = stream(b"xyz", DESC);
        let at = HEADER.len() + 3 + 2;
        s[at + 3] += 1;
        assert!(read_all(&s, 64).is_err());
    }

    #[test]
    fn a_stream_that_is_not_qemus_is_refused_at_once() {
        let e = read_all(b"NOTQEMU-STREAM", 64).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
        assert!(read_all(b"QEVM\0\0\0\x02rest", 3).is_err());
    }

    #[test]
    fn a_description_ending_the_body_with_zero_bytes_is_found() {
        // RAM pages of zeroes right before EOF, and a long description.
        let desc = format!("{{\"devices\":[{}]}}", "{\"name\":\"x\"},".repeat(20_000) + "{}");
        let s = stream(&vec![0u8; 3 << 20], &desc);
        assert_eq!(read_all(&s, 1 << 16).unwrap().len(), s.len());
    }
}
