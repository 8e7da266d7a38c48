//! Nix's base32: its own alphabet (no e, o, u, t) and its own bit order,
//! used in store path hashes and narinfo hashes.

/// The 32 characters, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Encodes bytes the way Nix prints hashes.
pub fn encode(bytes: &[u8]) -> String {
    let len = (bytes.len() * 8).div_ceil(5);
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = bytes.get(i).map_or(0, |v| u16::from(*v) >> j);
        let high = bytes.get(i + 1).map_or(0, |v| u16::from(*v) << (8 - j));
        out.push(ALPHABET[usize::from((low | high) & 0x1f)] as char);
    }
    out
}

/// Decodes a Nix base32 string of `len` bytes; None on a bad character or length.
pub fn decode(text: &str, len: usize) -> Option<Vec<u8>> {
    if text.len() != (len * 8).div_ceil(5) {
        return None;
    }
    let mut out = vec![0u8; len];
    for (n, c) in text.bytes().rev().enumerate() {
        let digit = ALPHABET.iter().position(|a| *a == c)? as u16;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        if i + 1 < len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_matches_nix() {
        // `nix hash convert --to nix32 sha256:…` of the all-zero hash is 52 zeros.
        assert_eq!(encode(&[0u8; 32]), "0".repeat(52));
        // sha256("") in Nix base32, as `nix-hash --type sha256 --to-base32` prints it.
        let empty = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae,
            0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
        ];
        assert_eq!(encode(&empty), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        for bytes in [vec![1u8, 2, 3, 4, 5], vec![0xff; 20], empty.to_vec()] {
            assert_eq!(decode(&encode(&bytes), bytes.len()), Some(bytes));
        }
        assert_eq!(decode("e", 1), None);
    }
}
