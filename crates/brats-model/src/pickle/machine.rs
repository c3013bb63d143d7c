//! The opcode interpreter of the restricted pickle machine: the stack, the memo and the guards
//! against deep nesting and memo expansion; callables and persistent ids are handed to the
//! object model in the parent module.

use std::collections::HashMap;

use super::{R, Value, call, persistent_load};

enum Item {
    Mark,
    /// A value and an upper bound of its nesting depth.
    V(Value, u32),
}

const MAX_DEPTH_ITEMS: usize = 1 << 24;
/// Deeper structures are refused: dropping or cloning them would recurse that deep.
const MAX_NESTING: u32 = 200;
/// Total values copied by memo `GET`/`PUT` and `DUP` ("billion laughs" guard).
const MAX_COPIED: u64 = 1 << 22;

/// Number of values in `v`, counting at most up to `limit`.
fn count_values(v: &Value, limit: u64) -> u64 {
    let mut n = 1;
    let add = |x: &Value, n: &mut u64| {
        if *n <= limit {
            *n += count_values(x, limit - *n);
        }
    };
    match v {
        Value::Tuple(xs) | Value::List(xs) => xs.iter().for_each(|x| add(x, &mut n)),
        Value::Dict(kv) => kv.iter().for_each(|(k, x)| {
            add(k, &mut n);
            add(x, &mut n);
        }),
        Value::Object { callable, args, state } => {
            add(callable, &mut n);
            add(args, &mut n);
            if let Some(s) = state {
                add(s, &mut n);
            }
        }
        _ => {}
    }
    n
}

struct Machine<'a> {
    b: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u64, (Value, u32)>,
    /// Largest nesting depth among the values popped by the current opcode.
    popped: u32,
    /// Values copied so far (see [`MAX_COPIED`]).
    copied: u64,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| format!("unexpected end of data at byte {}", self.pos))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn line(&mut self) -> R<&'a str> {
        let rest = &self.b[self.pos..];
        let n =
            rest.iter().position(|&c| c == b'\n').ok_or_else(|| format!("unterminated line at byte {}", self.pos))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "non-UTF-8 text line".to_string())?;
        self.pos += n + 1;
        Ok(s)
    }
    fn len_prefixed(&mut self, n: u64) -> R<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| "length overflow".to_string())?;
        self.take(n)
    }
    /// Pushes a value built by the current opcode: containers nest one deeper than what it
    /// popped.
    fn push(&mut self, v: Value) -> R<()> {
        let d = match v {
            Value::Tuple(_) | Value::List(_) | Value::Dict(_) | Value::Object { .. } => self.popped + 1,
            _ => 0,
        };
        self.push_d(v, d)
    }
    fn push_d(&mut self, v: Value, d: u32) -> R<()> {
        if self.stack.len() >= MAX_DEPTH_ITEMS {
            return Err("stack too deep".into());
        }
        if d > MAX_NESTING {
            return Err(format!("structure nested deeper than {MAX_NESTING} at byte {}", self.pos));
        }
        self.stack.push(Item::V(v, d));
        Ok(())
    }
    /// After the current opcode put what it popped into the top value.
    fn raise_top(&mut self) -> R<()> {
        let popped = self.popped;
        match self.stack.last_mut() {
            Some(Item::V(_, d)) => {
                *d = (*d).max(popped + 1);
                if *d > MAX_NESTING {
                    return Err(format!("structure nested deeper than {MAX_NESTING}"));
                }
                Ok(())
            }
            _ => Err(format!("no value on the stack at byte {}", self.pos)),
        }
    }
    fn pop(&mut self) -> R<Value> {
        match self.stack.pop() {
            Some(Item::V(v, d)) => {
                self.popped = self.popped.max(d);
                Ok(v)
            }
            Some(Item::Mark) => Err(format!("unexpected MARK on the stack at byte {}", self.pos)),
            None => Err(format!("stack underflow at byte {}", self.pos)),
        }
    }
    fn top(&mut self) -> R<&mut Value> {
        match self.stack.last_mut() {
            Some(Item::V(v, _)) => Ok(v),
            _ => Err(format!("no value on the stack at byte {}", self.pos)),
        }
    }
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let i = self
            .stack
            .iter()
            .rposition(|x| matches!(x, Item::Mark))
            .ok_or_else(|| format!("no MARK on the stack at byte {}", self.pos))?;
        let items = self.stack.split_off(i + 1);
        self.stack.pop();
        let mut popped = self.popped;
        let values = items
            .into_iter()
            .map(|x| match x {
                Item::V(v, d) => {
                    popped = popped.max(d);
                    v
                }
                Item::Mark => unreachable!("rposition found the last mark"),
            })
            .collect();
        self.popped = popped;
        Ok(values)
    }
    fn charge_copy(&mut self, v: &Value) -> R<()> {
        self.copied += count_values(v, MAX_COPIED);
        if self.copied > MAX_COPIED {
            return Err(format!("pickle expands to more than {MAX_COPIED} copied values"));
        }
        Ok(())
    }
    fn top_with_depth(&mut self) -> R<(Value, u32)> {
        let (v, d) = match self.stack.last() {
            Some(Item::V(v, d)) => (v.clone(), *d),
            _ => return Err(format!("no value on the stack at byte {}", self.pos)),
        };
        self.charge_copy(&v)?;
        Ok((v, d))
    }
    fn memo_put(&mut self, k: u64) -> R<()> {
        let vd = self.top_with_depth()?;
        self.memo.insert(k, vd);
        Ok(())
    }
    fn memo_get(&mut self, k: u64) -> R<()> {
        let (v, d) = self.memo.get(&k).cloned().ok_or_else(|| format!("memo key {k} not found"))?;
        self.charge_copy(&v)?;
        self.push_d(v, d)
    }
}

fn long_from_le(bytes: &[u8]) -> R<i64> {
    if bytes.is_empty() {
        return Ok(0);
    }
    if bytes.len() > 8 {
        // Accept only if it is a sign extension of an i64.
        let (lo, hi) = bytes.split_at(8);
        let v = i64::from_le_bytes(lo.try_into().expect("8"));
        let fill = if v < 0 { 0xFF } else { 0 };
        if hi.iter().all(|&b| b == fill) {
            return Ok(v);
        }
        return Err("integer does not fit in 64 bits".into());
    }
    let mut buf = if bytes[bytes.len() - 1] & 0x80 != 0 { [0xFF; 8] } else { [0; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Ok(i64::from_le_bytes(buf))
}

/// Runs a pickle program and returns the value it leaves (`STOP`).
pub fn load(b: &[u8]) -> Result<Value, String> {
    let mut m = Machine { b, pos: 0, stack: Vec::new(), memo: HashMap::new(), popped: 0, copied: 0 };
    loop {
        let at = m.pos;
        m.popped = 0;
        let op = m.u8()?;
        match op {
            0x80 => {
                let p = m.u8()?;
                if p > 5 {
                    return Err(format!("unsupported pickle protocol {p}"));
                }
            }
            0x95 => {
                m.u64()?; // FRAME: length only
            }
            b'.' => return m.pop(),
            b'(' => m.stack.push(Item::Mark),
            b'0' => {
                m.stack.pop().ok_or_else(|| format!("POP on an empty stack at byte {at}"))?;
            }
            b'1' => {
                m.pop_mark()?;
            }
            b'2' => {
                let (v, d) = m.top_with_depth()?;
                m.push_d(v, d)?;
            }
            b'N' => m.push(Value::None)?,
            0x88 => m.push(Value::Bool(true))?,
            0x89 => m.push(Value::Bool(false))?,
            b'J' => {
                let v = m.u32()? as i32;
                m.push(Value::Int(v as i64))?
            }
            b'K' => {
                let v = m.u8()?;
                m.push(Value::Int(v as i64))?
            }
            b'M' => {
                let v = m.u16()?;
                m.push(Value::Int(v as i64))?
            }
            0x8a => {
                let n = m.u8()? as u64;
                let bytes = m.len_prefixed(n)?;
                m.push(Value::Int(long_from_le(bytes)?))?
            }
            0x8b => {
                let n = m.u32()? as u64;
                let bytes = m.len_prefixed(n)?;
                m.push(Value::Int(long_from_le(bytes)?))?
            }
            b'I' | b'L' => {
                let s = m.line()?.trim_end_matches('L');
                let v = match s {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    _ => Value::Int(s.parse().map_err(|_| format!("bad int {s:?} at {at}"))?),
                };
                m.push(v)?
            }
            b'F' => {
                let s = m.line()?;
                let v = s.parse().map_err(|_| format!("bad float {s:?} at {at}"))?;
                m.push(Value::Float(v))?
            }
            b'G' => {
                let v = f64::from_be_bytes(m.take(8)?.try_into().expect("8"));
                m.push(Value::Float(v))?
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => m.u32()? as u64,
                    0x8c => m.u8()? as u64,
                    _ => m.u64()?,
                };
                let s = std::str::from_utf8(m.len_prefixed(n)?)
                    .map_err(|_| format!("invalid UTF-8 string at byte {at}"))?;
                m.push(Value::Str(s.to_string()))?
            }
            b'V' => {
                let s = m.line()?.to_string();
                m.push(Value::Str(s))?
            }
            b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'T' | b'B' => m.u32()? as u64,
                    b'U' | b'C' => m.u8()? as u64,
                    _ => m.u64()?,
                };
                let v = m.len_prefixed(n)?.to_vec();
                m.push(Value::Bytes(v))?
            }
            b'S' => {
                let s = m.line()?;
                let s = s.trim_matches(|c| c == '\'' || c == '"').to_string();
                m.push(Value::Str(s))?
            }
            b')' => m.push(Value::Tuple(Vec::new()))?,
            b't' => {
                let items = m.pop_mark()?;
                m.push(Value::Tuple(items))?
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(m.pop()?);
                }
                items.reverse();
                m.push(Value::Tuple(items))?
            }
            b']' => m.push(Value::List(Vec::new()))?,
            b'l' => {
                let items = m.pop_mark()?;
                m.push(Value::List(items))?
            }
            b'a' => {
                let v = m.pop()?;
                match m.top()? {
                    Value::List(l) => l.push(v),
                    Value::Object { .. } => {}
                    other => return Err(format!("APPEND to a {} at {at}", other.type_name())),
                }
                m.raise_top()?;
            }
            b'e' | 0x90 => {
                let items = m.pop_mark()?;
                match m.top()? {
                    Value::List(l) => l.extend(items),
                    Value::Object { .. } => {}
                    other => return Err(format!("APPENDS to a {} at {at}", other.type_name())),
                }
                m.raise_top()?;
            }
            0x8f => m.push(Value::List(Vec::new()))?,
            0x91 => {
                let items = m.pop_mark()?;
                m.push(Value::List(items))?
            }
            b'}' => m.push(Value::Dict(Vec::new()))?,
            b'd' => {
                let items = m.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err(format!("DICT with an odd number of items at {at}"));
                }
                let mut d = Vec::new();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                m.push(Value::Dict(d))?
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = m.pop()?;
                    let k = m.pop()?;
                    vec![k, v]
                } else {
                    m.pop_mark()?
                };
                if items.len() % 2 != 0 {
                    return Err(format!("SETITEMS with an odd number of items at {at}"));
                }
                match m.top()? {
                    Value::Dict(d) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            if let Some(e) = d.iter_mut().find(|(ek, _)| *ek == k) {
                                e.1 = v;
                            } else {
                                d.push((k, v));
                            }
                        }
                    }
                    Value::Object { .. } => {}
                    other => return Err(format!("SETITEM on a {} at {at}", other.type_name())),
                }
                m.raise_top()?;
            }
            b'c' => {
                let module = m.line()?.to_string();
                let name = m.line()?.to_string();
                m.push(Value::Global(module, name))?
            }
            0x93 => {
                let name = m.pop()?;
                let module = m.pop()?;
                match (module, name) {
                    (Value::Str(a), Value::Str(b)) => m.push(Value::Global(a, b))?,
                    _ => return Err(format!("STACK_GLOBAL needs two strings at {at}")),
                }
            }
            b'R' => {
                let args = m.pop()?;
                let f = m.pop()?;
                let v = call(f, args).map_err(|e| format!("{e} (at byte {at})"))?;
                m.push(v)?
            }
            0x81 => {
                let args = m.pop()?;
                let cls = m.pop()?;
                let v = call(cls, args).map_err(|e| format!("{e} (at byte {at})"))?;
                m.push(v)?
            }
            0x92 => {
                let _kwargs = m.pop()?;
                let args = m.pop()?;
                let cls = m.pop()?;
                let v = call(cls, args).map_err(|e| format!("{e} (at byte {at})"))?;
                m.push(v)?
            }
            b'b' => {
                let st = m.pop()?;
                match m.top()? {
                    Value::Object { state, .. } => *state = Some(Box::new(st)),
                    // OrderedDict `_metadata`, tensor/parameter state: not needed.
                    Value::Dict(_) | Value::Tensor(_) => {}
                    other => return Err(format!("BUILD on a {} at {at}", other.type_name())),
                }
                m.raise_top()?;
            }
            b'Q' => {
                let pid = m.pop()?;
                let v = persistent_load(pid).map_err(|e| format!("{e} (at byte {at})"))?;
                m.push(v)?
            }
            b'P' => return Err(format!("text PERSID is not used by torch.save (at {at})")),
            b'p' => {
                let k = m.line()?.parse().map_err(|_| format!("bad PUT at {at}"))?;
                m.memo_put(k)?
            }
            b'q' => {
                let k = m.u8()? as u64;
                m.memo_put(k)?
            }
            b'r' => {
                let k = m.u32()? as u64;
                m.memo_put(k)?
            }
            0x94 => {
                let k = m.memo.len() as u64;
                m.memo_put(k)?
            }
            b'g' => {
                let k = m.line()?.parse().map_err(|_| format!("bad GET at {at}"))?;
                m.memo_get(k)?
            }
            b'h' => {
                let k = m.u8()? as u64;
                m.memo_get(k)?
            }
            b'j' => {
                let k = m.u32()? as u64;
                m.memo_get(k)?
            }
            other => {
                return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {at}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_protocol2_dict() {
        // pickle.dumps({'a': 1, 'b': [1.5, None, True], 'c': (300, -2)}, protocol=2)
        let p: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(G?\xf8\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00cq\x04M,\x01J\xfe\xff\xff\xff\x86q\x05u.";
        let v = load(p).unwrap();
        let Value::Dict(d) = v else { panic!() };
        assert_eq!(d.len(), 3);
        assert_eq!(d[0], (Value::Str("a".into()), Value::Int(1)));
        assert_eq!(d[1].1, Value::List(vec![Value::Float(1.5), Value::None, Value::Bool(true)]));
        assert_eq!(d[2].1, Value::Tuple(vec![Value::Int(300), Value::Int(-2)]));
    }

    #[test]
    fn long1_and_memo() {
        // LONG1 with 9 bytes (sign-extended), BINPUT/BINGET
        let p: &[u8] = b"\x80\x02\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\xffq\x00h\x00\x86.";
        assert_eq!(load(p).unwrap(), Value::Tuple(vec![Value::Int(-1), Value::Int(-1)]));
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 100_000));
        p.extend(std::iter::repeat_n(b'a', 99_999));
        p.push(b'.');
        assert!(load(&p).unwrap_err().contains("nested deeper"));
        // Via tuples and memo copies too.
        let mut p = vec![0x80, 2, b')'];
        for _ in 0..1000 {
            p.extend_from_slice(b"q\x00h\x00\x86");
        }
        p.push(b'.');
        assert!(load(&p).is_err());
        // Moderate nesting is fine.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 50));
        p.extend(std::iter::repeat_n(b'a', 49));
        p.push(b'.');
        assert!(load(&p).is_ok());
    }

    #[test]
    fn malformed_programs_are_errors() {
        for p in [
            &b""[..],
            b"\x80\x02",
            b"\x80\x09.",
            b"\x80\x02t.",
            b"\x80\x02h\x05.",
            b"\x80\x02X\xff\xff\xff\x7fab",
            b"\x80\x02K\x01K\x02u.",
            b"\xff",
        ] {
            assert!(load(p).is_err(), "{p:?}");
        }
    }
}
