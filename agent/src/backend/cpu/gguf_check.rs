//! A bounded, in-process walk over a GGUF file's header (issue 17), run
//! before candle or llama.cpp see the file.
//!
//! candle's reader divides by `general.alignment` and trusts tensor offsets;
//! llama.cpp's loader aborts on some malformed files. This walk reads every
//! length-prefixed field against the bytes actually left in the file, and
//! checks the layout both readers rely on: alignment a power of two, tensor
//! shapes without overflow, every tensor's data inside the file, no duplicate
//! names. It refuses the common hostile files without starting a child
//! process; what it cannot judge (what llama.cpp makes of the metadata) is
//! left to the isolated check in `probe.rs`.
//!
//! It never allocates in proportion to a declared length: strings and arrays
//! are skipped, and the names it keeps (for duplicates) are capped in number
//! and length.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

/// `GGUF` as the first four bytes of the file.
const MAGIC: [u8; 4] = *b"GGUF";
/// ggml's default when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// `GGML_MAX_NAME` counts the NUL: a name has at most 63 bytes.
const MAX_TENSOR_NAME: u64 = 63;
/// Real files carry tens of metadata keys of tens of bytes and at most tens of
/// thousands of tensors; the caps bound what this walk holds in memory
/// (names kept to find duplicates) whatever the header declares.
const MAX_KEY_LEN: u64 = 1024;
const MAX_METADATA: u64 = 1 << 16;
const MAX_TENSORS: u64 = 1 << 20;
/// Nested arrays: candle's reader recurses, so the depth is bounded as it
/// bounds it.
const MAX_DEPTH: usize = 64;

/// Why a file is refused.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file breaks the format: no reader should be given it.
    #[error("{0}")]
    Malformed(String),
    /// A well-formed file in a tensor type the cpu backend cannot read.
    #[error(
        "tensor {tensor:?} has ggml type {ggml_type}, which the cpu backend cannot read (it reads f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q8_1 and the k-quants)"
    )]
    UnsupportedType { tensor: String, ggml_type: u32 },
}

/// What the walk learnt, for logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufSummary {
    pub version: u32,
    pub metadata: u64,
    pub tensors: u64,
    pub alignment: u64,
    /// Where tensor data starts.
    pub data_offset: u64,
}

/// (elements per block, bytes per block) of the ggml types candle reads; its
/// reader refuses the rest, so they are refused here with a clearer message.
fn ggml_type_layout(t: u32) -> Option<(u64, u64)> {
    Some(match t {
        0 => (1, 4),      // f32
        1 => (1, 2),      // f16
        2 => (32, 18),    // q4_0
        3 => (32, 20),    // q4_1
        6 => (32, 22),    // q5_0
        7 => (32, 24),    // q5_1
        8 => (32, 34),    // q8_0
        9 => (32, 36),    // q8_1
        10 => (256, 84),  // q2_k
        11 => (256, 110), // q3_k
        12 => (256, 144), // q4_k
        13 => (256, 176), // q5_k
        14 => (256, 210), // q6_k
        15 => (256, 292), // q8_k
        30 => (1, 2),     // bf16
        _ => return None,
    })
}

/// GGUF value types.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

fn malformed(msg: impl Into<String>) -> GgufError {
    GgufError::Malformed(msg.into())
}

/// A reader that knows how many bytes are left in the file.
struct Walk<R> {
    r: R,
    pos: u64,
    size: u64,
    /// GGUF v1 has 32-bit lengths and counts; v2 and v3 64-bit.
    wide: bool,
}

impl<R: Read + Seek> Walk<R> {
    fn left(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        if (N as u64) > self.left() {
            return Err(malformed(format!(
                "the file ends inside {what} (at byte {} of {})",
                self.pos, self.size
            )));
        }
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| malformed(format!("cannot read {what} at byte {}: {e}", self.pos)))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes::<4>(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes::<8>(what)?))
    }

    /// A length or count: u32 in v1, u64 after.
    fn len(&mut self, what: &str) -> Result<u64, GgufError> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    fn prefix(&self) -> u64 {
        if self.wide { 8 } else { 4 }
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), GgufError> {
        if n > self.left() {
            return Err(malformed(format!(
                "{what} at byte {} declares {n} bytes, but the file has {} left",
                self.pos,
                self.left()
            )));
        }
        let step = i64::try_from(n).map_err(|_| malformed(format!("{what} is too long")))?;
        self.r
            .seek_relative(step)
            .map_err(|e| malformed(format!("cannot skip {what}: {e}")))?;
        self.pos += n;
        Ok(())
    }

    /// A string's length, checked against the file; the bytes are skipped.
    fn skip_string(&mut self, what: &str) -> Result<(), GgufError> {
        let n = self.len(what)?;
        self.skip(n, what)
    }

    /// A string kept in memory (keys, names): at most `max` bytes.
    fn string(&mut self, max: u64, what: &str) -> Result<String, GgufError> {
        let n = self.len(what)?;
        if n > max {
            return Err(malformed(format!(
                "{what} at byte {} is {n} bytes long; at most {max} are allowed",
                self.pos
            )));
        }
        if n > self.left() {
            return Err(malformed(format!(
                "{what} at byte {} declares {n} bytes, but the file has {} left",
                self.pos,
                self.left()
            )));
        }
        // n <= max (1 KiB), so this allocation is bounded.
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|e| malformed(format!("cannot read {what}: {e}")))?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Bytes of one value of a fixed-size type; `None` for strings and arrays.
    fn fixed_size(t: u32) -> Option<u64> {
        match t {
            T_U8 | T_I8 | T_BOOL => Some(1),
            T_U16 | T_I16 => Some(2),
            T_U32 | T_I32 | T_F32 => Some(4),
            T_U64 | T_I64 | T_F64 => Some(8),
            _ => None,
        }
    }

    /// The least bytes one value of type `t` takes in the file.
    fn min_size(&self, t: u32) -> u64 {
        match t {
            T_STRING => self.prefix(),
            T_ARRAY => 4 + self.prefix(),
            t => Self::fixed_size(t).unwrap_or(1),
        }
    }

    /// Skips one value of type `t`, checking every length in it.
    fn skip_value(&mut self, t: u32, key: &str, depth: usize) -> Result<(), GgufError> {
        if let Some(n) = Self::fixed_size(t) {
            return self.skip(n, key);
        }
        match t {
            T_STRING => self.skip_string(key),
            T_ARRAY => {
                if depth >= MAX_DEPTH {
                    return Err(malformed(format!(
                        "metadata {key:?} nests arrays deeper than {MAX_DEPTH}"
                    )));
                }
                let elem = self.u32(key)?;
                if Self::fixed_size(elem).is_none() && elem != T_STRING && elem != T_ARRAY {
                    return Err(malformed(format!(
                        "metadata {key:?} is an array of unknown type {elem}"
                    )));
                }
                let n = self.len(key)?;
                // Checked before walking: a count of 2^60 strings must not
                // make this loop run 2^60 times.
                let least = n.checked_mul(self.min_size(elem));
                if least.is_none_or(|b| b > self.left()) {
                    return Err(malformed(format!(
                        "metadata {key:?} declares {n} array elements, more than the {} bytes left in the file can hold",
                        self.left()
                    )));
                }
                match Self::fixed_size(elem) {
                    Some(size) => self.skip(n * size, key),
                    None => {
                        for _ in 0..n {
                            self.skip_value(elem, key, depth + 1)?;
                        }
                        Ok(())
                    }
                }
            }
            _ => Err(malformed(format!(
                "metadata {key:?} has unknown value type {t}"
            ))),
        }
    }
}

/// Walks the header of the GGUF file at `path`.
pub fn check_file(path: &Path) -> Result<GgufSummary, GgufError> {
    let io = |source| GgufError::Io {
        path: path.display().to_string(),
        source,
    };
    let f = File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    check(BufReader::with_capacity(1 << 16, f), size)
}

/// Walks a GGUF header from `r`, a file of `size` bytes.
pub fn check<R: Read + Seek>(r: R, size: u64) -> Result<GgufSummary, GgufError> {
    let mut w = Walk {
        r,
        pos: 0,
        size,
        wide: true,
    };
    let magic = w.bytes::<4>("the magic number")?;
    if magic != MAGIC {
        return Err(malformed(format!(
            "not a GGUF file: it starts with {magic:02x?}, not \"GGUF\""
        )));
    }
    let version = w.u32("the version")?;
    if !(1..=3).contains(&version) {
        return Err(malformed(format!(
            "GGUF version {version} is not known (1 to 3 are)"
        )));
    }
    w.wide = version >= 2;
    let tensors = w.len("the tensor count")?;
    let metadata = w.len("the metadata count")?;
    if tensors > MAX_TENSORS || metadata > MAX_METADATA {
        return Err(malformed(format!(
            "the header declares {tensors} tensors and {metadata} metadata entries; at most {MAX_TENSORS} and {MAX_METADATA} are accepted"
        )));
    }
    // Each entry takes at least its length prefixes and fixed fields.
    let least = metadata * (w.prefix() + 4 + 1) + tensors * (w.prefix() + 4 + 4 + 8);
    if least > w.left() {
        return Err(malformed(format!(
            "the header declares {tensors} tensors and {metadata} metadata entries, which need at least {least} bytes; the file has {} left",
            w.left()
        )));
    }

    let mut keys = HashSet::new();
    let mut alignment = None;
    for _ in 0..metadata {
        let key = w.string(MAX_KEY_LEN, "a metadata key")?;
        if key.is_empty() {
            return Err(malformed("a metadata key is empty"));
        }
        let t = w.u32(&key)?;
        if key == "general.alignment" {
            if t != T_U32 {
                return Err(malformed(format!(
                    "general.alignment has value type {t}; it must be a uint32"
                )));
            }
            let a = w.u32(&key)?;
            if a == 0 || !a.is_power_of_two() {
                return Err(malformed(format!(
                    "general.alignment is {a}; it must be a power of two"
                )));
            }
            alignment = Some(u64::from(a));
        } else {
            w.skip_value(t, &key, 0)?;
        }
        if keys.contains(&key) {
            return Err(malformed(format!("metadata key {key:?} appears twice")));
        }
        keys.insert(key);
    }
    drop(keys);
    let alignment = alignment.unwrap_or(DEFAULT_ALIGNMENT);

    // (name, offset, bytes) of each tensor, checked once the data start is known.
    let mut infos: Vec<(String, u64, u64)> = Vec::new();
    let mut names = HashSet::new();
    for _ in 0..tensors {
        let name = w.string(MAX_TENSOR_NAME, "a tensor name")?;
        let n_dims = w.u32(&name)?;
        if n_dims > MAX_DIMS {
            return Err(malformed(format!(
                "tensor {name:?} has {n_dims} dimensions; at most {MAX_DIMS} are allowed"
            )));
        }
        let mut dims = [1u64; MAX_DIMS as usize];
        for d in dims.iter_mut().take(n_dims as usize) {
            *d = w.len(&name)?;
            // ggml keeps dimensions in int64.
            if *d > i64::MAX as u64 {
                return Err(malformed(format!("tensor {name:?} has a dimension of {d}")));
            }
        }
        let ggml_type = w.u32(&name)?;
        let offset = w.u64(&name)?;
        let (block, block_bytes) =
            ggml_type_layout(ggml_type).ok_or_else(|| GgufError::UnsupportedType {
                tensor: name.clone(),
                ggml_type,
            })?;
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or_else(|| {
                malformed(format!(
                    "tensor {name:?} has shape {:?}, whose element count overflows",
                    &dims[..n_dims as usize]
                ))
            })?;
        // ggml blocks run along the first dimension.
        if dims[0] % block != 0 {
            return Err(malformed(format!(
                "tensor {name:?} has {} elements per row, not a multiple of its type's block of {block}",
                dims[0]
            )));
        }
        let bytes = (elements / block)
            .checked_mul(block_bytes)
            .ok_or_else(|| malformed(format!("tensor {name:?} is too large")))?;
        if offset % alignment != 0 {
            return Err(malformed(format!(
                "tensor {name:?} starts at data offset {offset}, not a multiple of the alignment {alignment}"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(malformed(format!("tensor {name:?} appears twice")));
        }
        infos.push((name, offset, bytes));
    }
    drop(names);

    let data_offset = w
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| malformed("the tensor data offset overflows"))?;
    for (name, offset, bytes) in &infos {
        let end = data_offset
            .checked_add(*offset)
            .and_then(|s| s.checked_add(*bytes));
        if end.is_none_or(|e| e > size) {
            return Err(malformed(format!(
                "tensor {name:?} needs {bytes} bytes at file offset {}, past the end of the file ({size} bytes)",
                data_offset.saturating_add(*offset)
            )));
        }
    }
    Ok(GgufSummary {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    use candle_core::{Device, Tensor};

    /// A GGUF v3 file built by hand, so that any field can be wrong.
    #[derive(Default)]
    struct Raw {
        md: Vec<u8>,
        n_md: u64,
        ti: Vec<u8>,
        n_ti: u64,
        data: Vec<u8>,
        alignment: usize,
    }

    impl Raw {
        fn new() -> Self {
            Raw {
                alignment: 32,
                ..Default::default()
            }
        }
        fn str(buf: &mut Vec<u8>, s: &str) {
            buf.extend((s.len() as u64).to_le_bytes());
            buf.extend(s.as_bytes());
        }
        fn kv_u32(mut self, k: &str, v: u32) -> Self {
            Self::str(&mut self.md, k);
            self.md.extend(T_U32.to_le_bytes());
            self.md.extend(v.to_le_bytes());
            self.n_md += 1;
            self
        }
        fn kv_raw(mut self, k: &str, t: u32, raw: &[u8]) -> Self {
            Self::str(&mut self.md, k);
            self.md.extend(t.to_le_bytes());
            self.md.extend(raw);
            self.n_md += 1;
            self
        }
        fn tensor(mut self, name: &str, dims: &[u64], t: u32, offset: u64, bytes: usize) -> Self {
            Self::str(&mut self.ti, name);
            self.ti.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.ti.extend(d.to_le_bytes());
            }
            self.ti.extend(t.to_le_bytes());
            self.ti.extend(offset.to_le_bytes());
            self.n_ti += 1;
            self.data.extend(vec![0u8; bytes]);
            self
        }
        fn build(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(3u32.to_le_bytes());
            out.extend(self.n_ti.to_le_bytes());
            out.extend(self.n_md.to_le_bytes());
            out.extend(&self.md);
            out.extend(&self.ti);
            if self.alignment > 0 {
                while out.len() % self.alignment != 0 {
                    out.push(0);
                }
            }
            out.extend(&self.data);
            out
        }
    }

    fn run(bytes: &[u8]) -> Result<GgufSummary, GgufError> {
        check(Cursor::new(bytes), bytes.len() as u64)
    }

    fn refused(bytes: &[u8], needle: &str) {
        match run(bytes) {
            Err(GgufError::Malformed(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
            other => panic!("expected Malformed({needle}), got {other:?}"),
        }
    }

    #[test]
    fn a_file_candle_writes_passes() {
        let t = Tensor::arange(0f32, 64.0, &Device::Cpu)
            .and_then(|t| t.reshape((2, 32)))
            .expect("tensor");
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).expect("quantize");
        let n = QTensor::quantize(
            &Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).expect("ones"),
            GgmlDType::F32,
        )
        .expect("f32");
        let arch = gguf_file::Value::String("llama".into());
        let toks = gguf_file::Value::Array(vec![
            gguf_file::Value::String("a".into()),
            gguf_file::Value::String("b".into()),
        ]);
        let mut buf = Cursor::new(Vec::new());
        gguf_file::write(
            &mut buf,
            &[
                ("general.architecture", &arch),
                ("tokenizer.ggml.tokens", &toks),
            ],
            &[("w", &q), ("norm", &n)],
        )
        .expect("write");
        let s = run(buf.get_ref()).expect("a valid file");
        assert_eq!(
            (s.version, s.metadata, s.tensors, s.alignment),
            (2, 2, 2, 32)
        );
    }

    #[test]
    fn alignment_must_be_a_power_of_two() {
        let ok = Raw::new().kv_u32("general.alignment", 64);
        assert_eq!(run(&ok.build()).expect("64").alignment, 64);
        for a in [0, 3, 48] {
            let mut r = Raw::new().kv_u32("general.alignment", a);
            r.alignment = 0;
            refused(&r.build(), "power of two");
        }
        refused(
            &Raw::new()
                .kv_raw("general.alignment", T_U64, &32u64.to_le_bytes())
                .build(),
            "uint32",
        );
    }

    #[test]
    fn lengths_are_checked_against_the_file() {
        let mut huge = (1u64 << 63).to_le_bytes().to_vec();
        huge.extend(b"x");
        refused(
            &Raw::new().kv_raw("general.name", T_STRING, &huge).build(),
            "declares 9223372036854775808 bytes",
        );
        // An array of 2^60 strings fails on its count, not after 2^60 steps.
        let mut arr = T_STRING.to_le_bytes().to_vec();
        arr.extend((1u64 << 60).to_le_bytes());
        refused(
            &Raw::new()
                .kv_raw("tokenizer.ggml.tokens", T_ARRAY, &arr)
                .build(),
            "array elements",
        );
        let mut bytes = Raw::new().build();
        bytes[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        refused(&bytes, "at most");
        bytes[8..16].copy_from_slice(&1000u64.to_le_bytes());
        refused(&bytes, "need at least");
        refused(b"GGU", "ends inside");
        refused(b"GGML\x03\0\0\0", "not a GGUF file");
        refused(
            &Raw::new().kv_raw("x", 13, &[0]).build(),
            "unknown value type 13",
        );
    }

    #[test]
    fn tensor_data_must_lie_inside_the_file() {
        let ok = Raw::new().tensor("w", &[32, 2], 0, 0, 256);
        assert_eq!(run(&ok.build()).expect("fits").tensors, 1);
        refused(
            &Raw::new().tensor("w", &[32, 2], 0, 1 << 40, 256).build(),
            "past the end of the file",
        );
        refused(
            &Raw::new().tensor("w", &[32, 4], 0, 0, 256).build(),
            "past the end of the file",
        );
        refused(
            &Raw::new().tensor("w", &[1 << 40, 1 << 30], 0, 0, 0).build(),
            "overflows",
        );
        refused(
            &Raw::new().tensor("w", &[32, 2], 0, 8, 256).build(),
            "multiple of the alignment",
        );
        refused(
            &Raw::new().tensor("w", &[33], 8, 0, 64).build(),
            "block of 32",
        );
        refused(
            &Raw::new()
                .tensor("w", &[32], 0, 0, 128)
                .tensor("w", &[32], 0, 128, 128)
                .build(),
            "appears twice",
        );
        refused(
            &Raw::new().tensor("w", &[1, 1, 1, 1, 1], 0, 0, 4).build(),
            "dimensions",
        );
        refused(
            &Raw::new().tensor(&"n".repeat(64), &[1], 0, 0, 4).build(),
            "at most 63",
        );
        match run(&Raw::new().tensor("w", &[256], 99, 0, 0).build()) {
            Err(GgufError::UnsupportedType { ggml_type: 99, .. }) => {}
            other => panic!("expected UnsupportedType, got {other:?}"),
        }
    }

    #[test]
    fn type_layouts_agree_with_candle() {
        use GgmlDType::*;
        for (id, t) in [
            (0, F32),
            (1, F16),
            (2, Q4_0),
            (3, Q4_1),
            (6, Q5_0),
            (7, Q5_1),
            (8, Q8_0),
            (9, Q8_1),
            (10, Q2K),
            (11, Q3K),
            (12, Q4K),
            (13, Q5K),
            (14, Q6K),
            (15, Q8K),
            (30, BF16),
        ] {
            assert_eq!(
                ggml_type_layout(id),
                Some((t.block_size() as u64, t.type_size() as u64)),
                "{t:?}"
            );
        }
    }
}
