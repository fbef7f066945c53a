//! A pass over a `data.pkl` before candle's unpickler sees it.
//!
//! candle's unpickler trusts the lengths in the stream: a `BINUNICODE` claiming 4 GiB allocates
//! 4 GiB before reading a byte (found by `fuzz/`'s `pth_reader`), a `LONG1` of more than eight
//! bytes overflows a shift, and memo gets that copy growing tuples expand a few hundred bytes
//! into gigabytes of objects. This pass walks the opcodes candle knows, checks every length
//! against the bytes that remain, and counts the objects the stream would build (memo copies
//! included), refusing a stream past [`MAX_OBJECTS`]. It decides nothing about the meaning of
//! the stream: candle parses it after.

use std::collections::HashMap;

/// The most objects a state dict may unpickle to: a 14B DiT's has about 20 000 (a dozen per
/// tensor), so this leaves a wide margin and still bounds the memory of a hostile stream.
pub const MAX_OBJECTS: u64 = 1 << 24;

/// Checks `pickle`; `Err` says what is wrong and at which byte.
pub(crate) fn check_pickle(pickle: &[u8]) -> Result<(), String> {
    let mut walk = Walk {
        bytes: pickle,
        at: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    while walk.at < pickle.len() {
        let position = walk.at;
        let op = walk.take(1)?[0];
        if walk
            .step(op)
            .map_err(|e| format!("{e} (opcode {op:#04x} at byte {position})"))?
        {
            return Ok(());
        }
    }
    Err("the pickle ends without a STOP".into())
}

/// The walk's state: where it is, and the size in objects of every stack entry (`None` for a
/// MARK) and memo slot.
struct Walk<'a> {
    bytes: &'a [u8],
    at: usize,
    stack: Vec<Option<u64>>,
    memo: HashMap<u32, u64>,
}

impl<'a> Walk<'a> {
    /// The next `n` bytes, if the stream holds them.
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let bytes: &'a [u8] = self.bytes;
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| {
                format!(
                    "an argument of {n} bytes but {} remain",
                    bytes.len() - self.at
                )
            })?;
        let taken = &bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn line(&mut self) -> Result<(), String> {
        let rest = &self.bytes[self.at..];
        let length = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("a GLOBAL name without its newline")?;
        self.at += length + 1;
        Ok(())
    }

    fn push(&mut self, objects: u64) -> Result<(), String> {
        if objects > MAX_OBJECTS {
            return Err(format!(
                "the pickle expands past {MAX_OBJECTS} objects (memo copies included)"
            ));
        }
        self.stack.push(Some(objects));
        Ok(())
    }

    fn pop(&mut self) -> Result<u64, String> {
        match self.stack.pop() {
            Some(Some(objects)) => Ok(objects),
            Some(None) => Err("a MARK where an object was expected".into()),
            None => Err("the stack is empty".into()),
        }
    }

    /// The objects above the last MARK, summed; the MARK is removed.
    fn pop_to_mark(&mut self) -> Result<u64, String> {
        let mut total = 0u64;
        loop {
            match self.stack.pop() {
                Some(Some(objects)) => total = total.saturating_add(objects),
                Some(None) => return Ok(total),
                None => return Err("no MARK on the stack".into()),
            }
        }
    }

    /// Adds `objects` to the container on top of the stack.
    fn grow_top(&mut self, objects: u64) -> Result<(), String> {
        let top = self.pop()?;
        self.push(top.saturating_add(objects))
    }

    /// One opcode with its arguments; `Ok(true)` at STOP.
    fn step(&mut self, op: u8) -> Result<bool, String> {
        match op {
            b'.' => return Ok(true),
            // PROTO, BININT1, BININT2, BININT, BINFLOAT: fixed-size arguments.
            0x80 => drop(self.take(1)?),
            b'K' => self.scalar(1)?,
            b'M' => self.scalar(2)?,
            b'J' => self.scalar(4)?,
            b'G' => self.scalar(8)?,
            b'c' => {
                self.line()?;
                self.line()?;
                self.push(1)?;
            }
            b'X' => {
                let length = self.u32()? as usize;
                self.take(length)?;
                self.push(1)?;
            }
            0x8a => {
                let length = self.take(1)?[0] as usize;
                if length > 8 {
                    return Err(format!("a LONG1 of {length} bytes (at most 8 are read)"));
                }
                self.take(length)?;
                self.push(1)?;
            }
            b'N' | 0x88 | 0x89 | b')' | b']' | b'}' => self.push(1)?,
            b'(' => self.stack.push(None),
            b'q' => {
                let slot = u32::from(self.take(1)?[0]);
                self.put(slot)?;
            }
            b'r' => {
                let slot = self.u32()?;
                self.put(slot)?;
            }
            b'h' => {
                let slot = u32::from(self.take(1)?[0]);
                self.get(slot)?;
            }
            b'j' => {
                let slot = self.u32()?;
                self.get(slot)?;
            }
            // DICT (`d`): candle reads it as EMPTY_DICT, leaving the MARK; so does this walk.
            b'd' => self.push(1)?,
            b't' => {
                let inner = self.pop_to_mark()?;
                self.push(inner.saturating_add(1))?;
            }
            0x85..=0x87 => {
                let count = usize::from(op - 0x84);
                let mut inner = 1u64;
                for _ in 0..count {
                    inner = inner.saturating_add(self.pop()?);
                }
                self.push(inner)?;
            }
            b'a' | b'b' => {
                let value = self.pop()?;
                self.grow_top(value)?;
            }
            b's' => {
                let pair = self.pop()?.saturating_add(self.pop()?);
                self.grow_top(pair)?;
            }
            b'e' | b'u' => {
                let inner = self.pop_to_mark()?;
                self.grow_top(inner)?;
            }
            b'Q' => {
                let id = self.pop()?;
                self.push(id.saturating_add(1))?;
            }
            b'R' | 0x81 => {
                let arguments = self.pop()?.saturating_add(self.pop()?);
                self.push(arguments.saturating_add(1))?;
            }
            other => return Err(format!("unknown opcode {other:#04x}")),
        }
        Ok(false)
    }

    /// A number of `width` bytes: one object.
    fn scalar(&mut self, width: usize) -> Result<(), String> {
        self.take(width)?;
        self.push(1)
    }

    /// Memoises the top of the stack (left in place).
    fn put(&mut self, slot: u32) -> Result<(), String> {
        match self.stack.last() {
            Some(Some(objects)) => {
                self.memo.insert(slot, *objects);
                Ok(())
            }
            _ => Err("nothing to memoise".into()),
        }
    }

    /// Pushes a copy of a memoised object (candle clones it whole).
    fn get(&mut self, slot: u32) -> Result<(), String> {
        let objects = *self
            .memo
            .get(&slot)
            .ok_or_else(|| format!("memo slot {slot} is empty"))?;
        self.push(objects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_state_dict_passes() {
        // {"a": 1, "b": (2, 3)} at protocol 2.
        let pickle = b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02K\x03\x86u.";
        check_pickle(pickle).unwrap();
    }

    #[test]
    fn lengths_past_the_stream_and_long_longs_are_refused() {
        let claim = b"\x80\x02X\xff\xff\xff\xffab.";
        assert!(check_pickle(claim).unwrap_err().contains("remain"));
        let long = b"\x80\x02\x8a\x09123456789.";
        assert!(check_pickle(long).unwrap_err().contains("LONG1"));
        assert!(check_pickle(b"\x80\x02").unwrap_err().contains("STOP"));
        assert!(check_pickle(b"\x80\x02\xfe.")
            .unwrap_err()
            .contains("unknown"));
    }

    /// Each level copies the previous tuple eight times: 40 levels would be 8^40 objects.
    #[test]
    fn memo_copies_that_explode_are_refused() {
        let mut pickle = b"\x80\x02K\x01q\x00".to_vec();
        for level in 0..40u8 {
            pickle.push(b'(');
            for _ in 0..8 {
                pickle.extend_from_slice(&[b'h', level]);
            }
            pickle.extend_from_slice(&[b't', b'q', level + 1]);
        }
        pickle.push(b'.');
        assert!(check_pickle(&pickle).unwrap_err().contains("expands"));
    }
}
