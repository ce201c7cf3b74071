//! Authentication of a migration stream with a pre-shared key
//! (`--migration-key FILE` on both ends).
//!
//! Nyx authenticates rather than encrypts: a migration carries a whole
//! machine, and what must not happen is that someone else's stream is
//! accepted as one, or that a stream is changed on the way. A key shared
//! by both ends and HMAC-SHA256 (the `hmac` crate) give that with no
//! certificates to manage; TLS (rustls) would add secrecy and a PKI the
//! typical use (two hosts of one person, or a lab) does not need. Put the
//! link inside a VPN or SSH tunnel when the guest's memory is secret.
//!
//! The protocol: on each connection the destination first sends one line,
//! `nyx-migration none` (no key) or `nyx-migration hmac-sha256 NONCE` with
//! 32 fresh random bytes in hex. With a key the source then sends the
//! container in records: a 4-byte little-endian length (1..=64 KiB), the
//! bytes, and an HMAC-SHA256 tag over a domain label, the nonce, the
//! record's sequence number, its length and its bytes. The destination
//! checks every tag before it uses a byte: a wrong key, a changed, dropped,
//! reordered or replayed record (the nonce is new on every connection)
//! fails there and the destination refuses the machine. Its confirmation
//! `running` carries a tag over the nonce too, so no one but the
//! destination can make the source stop its guest.

use std::io::{self, Read, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// Bytes of the destination's nonce.
pub const NONCE_LEN: usize = 32;
/// The most bytes in one record.
pub const RECORD_MAX: usize = 64 << 10;
const TAG_LEN: usize = 32;
const DOMAIN: &[u8] = b"nyx-migration-v1";
const HELLO: &str = "nyx-migration";

/// A destination's nonce.
pub type Nonce = [u8; NONCE_LEN];

/// A pre-shared migration key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// The key in `path`: its bytes, without trailing white space (so
    /// `head -c 32 /dev/urandom | base64 > key` works), at least
    /// [`MIN_KEY_LEN`] of them.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read the migration key {}: {e}", path.display()))?;
        Self::from_bytes(&bytes).map_err(|e| format!("migration key {}: {e}", path.display()))
    }

    /// A key of these bytes (trailing white space removed).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        if end < MIN_KEY_LEN {
            return Err(format!(
                "it holds {end} bytes; use at least {MIN_KEY_LEN} random bytes (e.g. head -c 32 /dev/urandom | base64 > FILE)"
            ));
        }
        Ok(Key(bytes[..end].to_vec()))
    }

    fn mac(&self, label: &[u8], nonce: &Nonce, seq: u64, body: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length.
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        m.update(DOMAIN);
        m.update(label);
        m.update(nonce);
        m.update(&seq.to_le_bytes());
        m.update(&(body.len() as u64).to_le_bytes());
        m.update(body);
        m
    }

    /// The tag of the destination's confirmation line `line`.
    pub fn ack_tag(&self, nonce: &Nonce, line: &str) -> String {
        hex(&self.mac(b"ack", nonce, 0, line.as_bytes()).finalize().into_bytes())
    }

    /// Whether `tag` is the tag of `line` (in constant time).
    pub fn check_ack(&self, nonce: &Nonce, line: &str, tag: &str) -> bool {
        unhex(tag).is_some_and(|t| self.mac(b"ack", nonce, 0, line.as_bytes()).verify_slice(&t).is_ok())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// A fresh random nonce from the host.
pub fn new_nonce() -> io::Result<Nonce> {
    let mut n = [0u8; NONCE_LEN];
    let mut got = 0;
    while got < n.len() {
        // SAFETY: writes at most the remaining bytes of `n`.
        let r = unsafe { libc::getrandom(n[got..].as_mut_ptr().cast(), n.len() - got, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            got += r as usize;
        }
    }
    Ok(n)
}

/// The destination's first line (with its newline).
pub fn hello(nonce: Option<&Nonce>) -> String {
    match nonce {
        Some(n) => format!("{HELLO} hmac-sha256 {}\n", hex(n)),
        None => format!("{HELLO} none\n"),
    }
}

/// Whether `line` is a destination's first line.
pub fn is_hello(line: &str) -> bool {
    line.starts_with(HELLO) && line[HELLO.len()..].starts_with(' ')
}

/// The nonce of a destination's first line: `Ok(None)` for a destination
/// without a key.
pub fn parse_hello(line: &str) -> Result<Option<Nonce>, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [HELLO, "none"] => Ok(None),
        [HELLO, "hmac-sha256", n] => unhex(n)
            .and_then(|v| Nonce::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| "the destination's nonce is malformed".to_string()),
        _ => Err(format!(
            "the destination is not a Nyx migration destination (it said {line:?})"
        )),
    }
}

/// Writes a byte stream as authenticated records.
pub struct SealedWriter<W: Write> {
    inner: W,
    key: Key,
    nonce: Nonce,
    seq: u64,
    buf: Vec<u8>,
}

impl<W: Write> SealedWriter<W> {
    /// Records into `inner` under `key` and the destination's `nonce`.
    pub fn new(inner: W, key: Key, nonce: Nonce) -> Self {
        SealedWriter {
            inner,
            key,
            nonce,
            seq: 0,
            buf: Vec::with_capacity(RECORD_MAX),
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let tag = self
            .key
            .mac(b"data", &self.nonce, self.seq, &self.buf)
            .finalize()
            .into_bytes();
        self.inner.write_all(&(self.buf.len() as u32).to_le_bytes())?;
        self.inner.write_all(&self.buf)?;
        self.inner.write_all(&tag)?;
        self.seq += 1;
        self.buf.clear();
        Ok(())
    }

    /// Sends what is buffered and returns the inner writer, flushed.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for SealedWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(RECORD_MAX - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == RECORD_MAX {
            self.emit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit()?;
        self.inner.flush()
    }
}

/// Reads authenticated records, handing on only bytes whose tag checked.
pub struct OpenedReader<R: Read> {
    inner: R,
    key: Key,
    nonce: Nonce,
    seq: u64,
    buf: Vec<u8>,
    pos: usize,
    failure: Option<String>,
}

impl<R: Read> OpenedReader<R> {
    /// Reads records from `inner` made under `key` and `nonce`.
    pub fn new(inner: R, key: Key, nonce: Nonce) -> Self {
        OpenedReader {
            inner,
            key,
            nonce,
            seq: 0,
            buf: Vec::new(),
            pos: 0,
            failure: None,
        }
    }

    /// Why authentication failed, once it has.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    fn fail(&mut self, why: String) -> io::Error {
        self.failure = Some(why.clone());
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    /// Reads the next record; `false` at a clean end of the stream.
    fn next_record(&mut self) -> io::Result<bool> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.inner.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > RECORD_MAX {
            return Err(self.fail(format!(
                "authentication failed: record {} claims {len} bytes (is the source given the same --migration-key?)",
                self.seq
            )));
        }
        self.buf.resize(len, 0);
        self.inner.read_exact(&mut self.buf)?;
        let mut tag = [0u8; TAG_LEN];
        self.inner.read_exact(&mut tag)?;
        if self
            .key
            .mac(b"data", &self.nonce, self.seq, &self.buf)
            .verify_slice(&tag)
            .is_err()
        {
            return Err(self.fail(format!(
                "authentication failed at record {}: a wrong --migration-key, or the stream was changed on the way",
                self.seq
            )));
        }
        self.seq += 1;
        self.pos = 0;
        Ok(true)
    }
}

impl<R: Read> Read for OpenedReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.failure.is_some() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "authentication failed"));
        }
        if self.pos == self.buf.len() && !self.next_record()? {
            return Ok(0);
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> Key {
        Key::from_bytes(&[b; 32]).unwrap()
    }

    fn seal(k: &Key, nonce: &Nonce, data: &[u8]) -> Vec<u8> {
        let mut w = SealedWriter::new(Vec::new(), k.clone(), *nonce);
        for chunk in data.chunks(1000) {
            w.write_all(chunk).unwrap();
        }
        w.into_inner().unwrap()
    }

    fn open(k: &Key, nonce: &Nonce, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let mut r = OpenedReader::new(sealed, k.clone(), *nonce);
        let mut out = Vec::new();
        let res = r.read_to_end(&mut out);
        match (res, r.failure()) {
            (_, Some(f)) => Err(f.to_string()),
            (Err(e), None) => Err(e.to_string()),
            (Ok(_), None) => Ok(out),
        }
    }

    #[test]
    fn a_sealed_stream_opens_with_the_same_key_and_nonce_only() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let n = [1; NONCE_LEN];
        let sealed = seal(&key(1), &n, &data);
        assert_eq!(open(&key(1), &n, &sealed).unwrap(), data);
        assert!(open(&key(2), &n, &sealed)
            .unwrap_err()
            .contains("authentication failed"));
        assert!(open(&key(1), &[2; NONCE_LEN], &sealed)
            .unwrap_err()
            .contains("authentication failed"));
        // A record dropped: the next one is out of sequence.
        let first = 4 + RECORD_MAX + TAG_LEN;
        let mut dropped = sealed[..first].to_vec();
        dropped.extend_from_slice(&sealed[2 * first..]);
        assert!(open(&key(1), &n, &dropped)
            .unwrap_err()
            .contains("authentication failed"));
        // Cut in a record: an error, never data.
        assert!(open(&key(1), &n, &sealed[..first + 10]).is_err());
    }

    #[test]
    fn keys_and_hellos() {
        assert!(Key::from_bytes(b"short\n").is_err());
        assert!(Key::from_bytes(b"0123456789abcdef\n").is_ok());
        let n = [0xab; NONCE_LEN];
        assert_eq!(parse_hello(&hello(Some(&n))).unwrap(), Some(n));
        assert_eq!(parse_hello(&hello(None)).unwrap(), None);
        assert!(is_hello(&hello(None)) && !is_hello("running"));
        for bad in [
            "",
            "running",
            "nyx-migration hmac-sha256 zz",
            "nyx-migration hmac-sha256 abab",
        ] {
            assert!(parse_hello(bad).is_err(), "{bad}");
        }
        let k = key(3);
        let tag = k.ack_tag(&n, "running");
        assert!(k.check_ack(&n, "running", &tag));
        assert!(!k.check_ack(&[0; NONCE_LEN], "running", &tag));
        assert!(!key(4).check_ack(&n, "running", &tag));
        assert!(!k.check_ack(&n, "running", "00"));
        assert_ne!(new_nonce().unwrap(), new_nonce().unwrap());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_changed_byte_is_refused(data in proptest::collection::vec(any::<u8>(), 1..3000), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let n = [9; NONCE_LEN];
            let mut sealed = seal(&key(5), &n, &data);
            let i = at.index(sealed.len());
            sealed[i] ^= 1 << bit;
            prop_assert!(open(&key(5), &n, &sealed).is_err(), "byte {} changed was accepted", i);
        }
    }
}
