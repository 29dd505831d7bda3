//! Bytecode offset → source line, for every line-table format CPython used:
//!
//! * 3.8–3.9 `co_lnotab`: (address delta, signed line delta) byte pairs.
//! * 3.10 `co_linetable`: (byte-range length, signed line delta) pairs,
//!   delta -128 meaning "no line".
//! * 3.11+ `co_linetable` location table: variable-length entries with a
//!   code in bits 3–6 of the first byte and the range length in code
//!   units in bits 0–2.
//!
//! A table decodes once into sorted byte ranges ([`LineTable`]) that are
//! searched per frame.

/// Which encoding a code object's table uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Lnotab,
    Linetable310,
    Locations311,
}

impl Format {
    /// The format of CPython `3.minor`.
    pub fn for_minor(minor: u8) -> Format {
        match minor {
            ..=9 => Format::Lnotab,
            10 => Format::Linetable310,
            _ => Format::Locations311,
        }
    }
}

/// Decoded line ranges of one code object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LineTable {
    /// `(start, end, line)`: bytecode byte offsets `[start, end)` map to
    /// `line` (`None` where the table says "no line"). Sorted, disjoint.
    ranges: Vec<(u32, u32, Option<u32>)>,
    first_line: u32,
}

impl LineTable {
    /// Decodes `table` of `format`, for a code object whose
    /// `co_firstlineno` is `first_line`.
    pub fn decode(format: Format, table: &[u8], first_line: u32) -> LineTable {
        let ranges = match format {
            Format::Lnotab => lnotab(table, first_line),
            Format::Linetable310 => linetable310(table, first_line),
            Format::Locations311 => locations311(table, first_line),
        };
        LineTable { ranges, first_line }
    }

    /// The line of the instruction at byte offset `addr` (`addr < 0`: the
    /// frame has not started; CPython reports `co_firstlineno`).
    pub fn line(&self, addr: i64) -> u32 {
        if addr < 0 {
            return self.first_line;
        }
        let addr = addr as u32;
        let i = self.ranges.partition_point(|&(start, _, _)| start <= addr);
        if i == 0 {
            return self.first_line;
        }
        let (_, end, line) = self.ranges[i - 1];
        if addr < end {
            // No line for this instruction: report the closest line before.
            line.or_else(|| self.ranges[..i - 1].iter().rev().find_map(|r| r.2))
                .unwrap_or(self.first_line)
        } else {
            self.ranges
                .last()
                .and_then(|r| r.2)
                .unwrap_or(self.first_line)
        }
    }

    /// The first byte offset of each range on `line` (for tests and for
    /// callers mapping lines back to bytecode).
    pub fn ranges(&self) -> &[(u32, u32, Option<u32>)] {
        &self.ranges
    }
}

/// 3.8–3.9: `PyCode_Addr2Line` over `co_lnotab`.
fn lnotab(t: &[u8], first_line: u32) -> Vec<(u32, u32, Option<u32>)> {
    let mut out = Vec::new();
    let mut line = first_line as i64;
    let mut addr = 0u32;
    let mut start = 0u32;
    for pair in t.chunks_exact(2) {
        let next = addr + u32::from(pair[0]);
        if next != start {
            out.push((start, next, Some(line.max(0) as u32)));
            start = next;
        }
        addr = next;
        line += i64::from(pair[1] as i8);
    }
    out.push((start, u32::MAX, Some(line.max(0) as u32)));
    out
}

/// 3.10: `PyLineTable_NextAddressRange` over `co_linetable`.
fn linetable310(t: &[u8], first_line: u32) -> Vec<(u32, u32, Option<u32>)> {
    let mut out = Vec::new();
    let mut line = first_line as i64;
    let mut end = 0u32;
    for pair in t.chunks_exact(2) {
        let start = end;
        end = start + u32::from(pair[0]);
        let delta = pair[1] as i8;
        let this = if delta == -128 {
            None
        } else {
            line += i64::from(delta);
            Some(line.max(0) as u32)
        };
        if end > start {
            out.push((start, end, this));
        }
    }
    out
}

/// 3.11+: the location table (`Objects/locations.md`).
fn locations311(t: &[u8], first_line: u32) -> Vec<(u32, u32, Option<u32>)> {
    let mut out = Vec::new();
    let mut line = first_line as i64;
    let mut addr = 0u32;
    let mut i = 0usize;
    let varint = |i: &mut usize| -> u64 {
        let mut val = 0u64;
        let mut shift = 0;
        while let Some(&b) = t.get(*i) {
            *i += 1;
            val |= u64::from(b & 63) << shift;
            shift += 6;
            if b & 64 == 0 || shift > 60 {
                break;
            }
        }
        val
    };
    let svarint = |i: &mut usize| -> i64 {
        let u = varint(i);
        if u & 1 != 0 {
            -((u >> 1) as i64)
        } else {
            (u >> 1) as i64
        }
    };
    while let Some(&first) = t.get(i) {
        i += 1;
        if first & 0x80 == 0 {
            // Not an entry start: the table is corrupt; stop decoding.
            break;
        }
        let code = (first >> 3) & 15;
        let len = u32::from(first & 7) + 1;
        let this = match code {
            15 => None,
            14 => {
                line += svarint(&mut i);
                varint(&mut i); // end line delta
                varint(&mut i); // column + 1
                varint(&mut i); // end column + 1
                Some(line)
            }
            13 => {
                line += svarint(&mut i);
                Some(line)
            }
            10..=12 => {
                line += i64::from(code - 10);
                i += 2; // start and end column
                Some(line)
            }
            _ => {
                i += 1; // column byte
                Some(line)
            }
        };
        let start = addr;
        addr += len * 2;
        out.push((start, addr, this.map(|l| l.max(0) as u32)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Tables below were produced by the real interpreters
    // (`code.co_lnotab` / `co_linetable`, and `co_lines()` for the expected
    // ranges) for a function starting at line 2:
    //
    //     def f(x):          # line 2
    //         y = x + 1      # 3
    //         if y:          # 4
    //             return y   # 5
    //         return 0       # 6

    fn check(format: Format, table: &[u8], expect: &[(i64, i64, u32)]) {
        let t = LineTable::decode(format, table, 2);
        for &(start, end, line) in expect {
            for addr in (start..end).step_by(2) {
                assert_eq!(t.line(addr), line, "{format:?} offset {addr}");
            }
        }
        assert_eq!(t.line(-1), 2, "not started: co_firstlineno");
    }

    #[test]
    fn lnotab_3_8() {
        let expect = [(0, 8, 3), (8, 12, 4), (12, 16, 5), (16, 20, 6)];
        check(Format::Lnotab, b"\x00\x01\x08\x01\x04\x01\x04\x01", &expect);
    }

    #[test]
    fn linetable_3_10() {
        let expect = [(0, 8, 3), (8, 12, 4), (12, 16, 5), (16, 20, 6)];
        check(
            Format::Linetable310,
            b"\x08\x01\x04\x01\x04\x01\x04\x01",
            &expect,
        );
        // -128: no line, reports the previous line.
        let t = LineTable::decode(Format::Linetable310, b"\x02\x01\x02\x80\x02\x02", 10);
        assert_eq!(t.line(0), 11);
        assert_eq!(t.line(2), 11);
        assert_eq!(t.line(4), 13);
    }

    #[test]
    fn locations_3_11_3_12_3_13() {
        let t311 = b"\x80\x00\xd8\x08\t\x88A\x89\x05\x80A\xd8\x07\x08\xf0\x00\x01\x05\x11\xd8\x0f\x10\x88\x08\xd8\x0b\x0c\x881";
        check(
            Format::Locations311,
            t311,
            &[(0, 2, 2), (2, 12, 3), (12, 16, 4), (16, 20, 5), (20, 24, 6)],
        );
        let t312 =
            b"\x80\x00\xd8\x08\t\x88A\x89\x05\x80A\xd9\x07\x08\xd8\x0f\x10\x88\x08\xd8\x0b\x0c";
        check(
            Format::Locations311,
            t312,
            &[(0, 2, 2), (2, 12, 3), (12, 16, 4), (16, 20, 5), (20, 22, 6)],
        );
        let t313 =
            b"\x80\x00\xd8\x08\t\x88A\x89\x05\x80A\xde\x07\x08\xd8\x0f\x10\x88\x08\xd8\x0b\x0c";
        check(
            Format::Locations311,
            t313,
            &[(0, 2, 2), (2, 12, 3), (12, 26, 4), (26, 30, 5), (30, 32, 6)],
        );
    }

    #[test]
    fn location_forms() {
        let mut t = vec![0x80 | (13 << 3), 0x00]; // 1 unit, line +0 → 1
        t.extend([0x80 | (11 << 3) | 1, 4, 9]); // 2 units, line +1 → 2
        t.extend([0x80 | (3 << 3), 0x11]); // 1 unit, short form, line stays 2
        t.extend([0x80 | (15 << 3)]); // 1 unit, no location
        t.extend([0x80 | (10 << 3), 1, 2]); // 1 unit, one-line form, line +0 → 2
        t.extend([0x80 | (14 << 3) | 2, 0x04, 0, 5, 9]); // 3 units, line +2 → 4
        t.extend([0x80 | (13 << 3), 0x03]); // 1 unit, line -1 → 3
        let lt = LineTable::decode(Format::Locations311, &t, 1);
        assert_eq!(lt.line(0), 1);
        assert_eq!(lt.line(2), 2);
        assert_eq!(lt.line(6), 2);
        assert_eq!(lt.line(8), 2, "no-location unit reports the previous line");
        assert_eq!(lt.line(10), 2);
        assert_eq!(lt.line(12), 4);
        assert_eq!(lt.line(16), 4);
        assert_eq!(lt.line(18), 3);
    }

    #[test]
    fn varint_continuation() {
        // line delta +100: svarint 200 = 0b11_001000 → chunks 8 | 64, 3
        let t = vec![0x80 | (13 << 3), 8 | 64, 3];
        let lt = LineTable::decode(Format::Locations311, &t, 1);
        assert_eq!(lt.line(0), 101);
    }
}
