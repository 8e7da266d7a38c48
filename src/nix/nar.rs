//! NAR (Nix ARchive) serialisation of a file system tree, byte for byte as
//! `nix-store --dump` writes it: regular files (with the executable bit),
//! symlinks and directories with entries sorted by name.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Writes a NAR "string": little-endian u64 length, bytes, zero padding to 8.
fn write_str(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    out.write_all(&(bytes.len() as u64).to_le_bytes())?;
    out.write_all(bytes)?;
    let pad = (8 - bytes.len() % 8) % 8;
    out.write_all(&[0u8; 8][..pad])
}

/// Serialises the tree at `path` as a NAR into `out`; returns the bytes written.
pub fn dump(path: &Path, out: &mut impl Write) -> io::Result<u64> {
    let mut counting = Counting { inner: out, count: 0 };
    write_str(&mut counting, b"nix-archive-1")?;
    node(path, &mut counting)?;
    Ok(counting.count)
}

fn node(path: &Path, out: &mut impl Write) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    write_str(out, b"(")?;
    write_str(out, b"type")?;
    if meta.file_type().is_symlink() {
        write_str(out, b"symlink")?;
        write_str(out, b"target")?;
        let target = std::fs::read_link(path)?;
        write_str(out, target.as_os_str().as_encoded_bytes())?;
    } else if meta.is_dir() {
        write_str(out, b"directory")?;
        let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            write_str(out, b"entry")?;
            write_str(out, b"(")?;
            write_str(out, b"name")?;
            write_str(out, entry.file_name().as_encoded_bytes())?;
            write_str(out, b"node")?;
            node(&entry.path(), out)?;
            write_str(out, b")")?;
        }
    } else if meta.is_file() {
        write_str(out, b"regular")?;
        if meta.permissions().mode() & 0o100 != 0 {
            write_str(out, b"executable")?;
            write_str(out, b"")?;
        }
        write_str(out, b"contents")?;
        let len = meta.len();
        out.write_all(&len.to_le_bytes())?;
        let copied = io::copy(&mut std::fs::File::open(path)?.take(len), out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} changed while being read", path.display()),
            ));
        }
        let pad = ((8 - len % 8) % 8) as usize;
        out.write_all(&[0u8; 8][..pad])?;
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file, directory or symlink", path.display()),
        ));
    }
    write_str(out, b")")
}

struct Counting<'a, W> {
    inner: &'a mut W,
    count: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_length_prefixed_and_padded() {
        let mut out = Vec::new();
        write_str(&mut out, b"abc").unwrap();
        assert_eq!(out, [3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0]);
        out.clear();
        write_str(&mut out, b"").unwrap();
        assert_eq!(out, [0u8; 8]);
    }
}
