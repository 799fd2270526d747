//! `--ingest`: decode one ingest batch (consumers/ingest) into Arrow, one file per event kind.
//!
//! The batch comes as a *frame* file that agentledger wrote: the raw bytes its transport fetched,
//! in chunks, each of which this decoder splits into messages exactly as the transport's own
//! Python code would:
//!
//! * kind 0, values: messages one after the other; per message (offset i64, partition i32, length u32);
//! * kind 1, Kafka: what a Kafka fetch returned for one partition (record batches, message format
//!   v2, uncompressed or LZ4), read from the fetch offset on; each batch's CRC-32C is checked, control
//!   batches carry no messages, a trailing partial batch is ignored -- as kafka-python does;
//! * kind 2, embedded log: bytes of one segment (an Avro object container file, one record per block)
//!   and the block position of each offset; the value is the segment's single-object header (magic
//!   and fingerprint) followed by the block's record.
//!
//! Message `k` of chunk `c` is numbered `c << 32 | k`, the order in which ingest sees them.
//!
//! It *vouches* for a message only when everything today's Python path checks holds: the
//! single-object header with the current writer schema's fingerprint, at most the size limit, the
//! hash field's tag, SHA-256 over the bytes up to the hash field equal to the hash the message
//! carries, and a body that decodes (arrow-avro) to exactly one record spanning it whose `hash`
//! is that hash. Everything else -- damage, an older writer schema, a chunk it cannot parse, bytes it
//! does not expect -- it leaves to agentledger's Python path (`punted.bin`, `"chunks"`), which
//! quarantines with a reason or decodes it the slow way. It never rejects anything itself.
//!
//! Output in ``--out-dir``:
//! * `kind-<branch>.arrow`: the vouched events of one kind (every field of the event except
//!   `payload`, then `payload` as that kind's record), then `_i`, `source_partition`, `source_offset`;
//! * `env.arrow`: per vouched event, in order: `_i`, session_id, seq, prev_hash, hash, event_id,
//!   occurred_at, branch -- what the chain guard reads;
//! * `sessions.arrow`: per session, over its vouched events in order: `n`, the first seq and
//!   prev_hash, the last seq and hash, first/last occurred_at, whether it ended, and `linked`:
//!   each event's seq is the previous one's + 1 and its prev_hash the previous one's hash;
//! * `punted.bin`: the numbers (i64 LE) of the messages of parsed chunks it does not vouch for.
//!
//! Prints one JSON line: {"records": N, "rows": vouched, "punted": n, "chunks": [records per chunk,
//! -1 for a chunk it could not parse], "kinds": {"<branch>": rows}, "dup_event_ids": bool}.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{
    Array, ArrayRef, Int32Array, Int64Array, Int8Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt32Array, UnionArray,
};
use arrow_avro::reader::{DecoderMode, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use arrow_ipc::writer::FileWriter;
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow_select::take::take;
use sha2::{Digest, Sha256};

use crate::{plain, plain_field, varint};

const MAGIC: &[u8; 8] = b"ALFRAME1";
const SOE: [u8; 2] = [0xc3, 0x01];
const SOE_HEADER_LEN: usize = 10;
const HASH_FIELD_LEN: usize = 66; // the tag of a 64-byte string, then 64 hex digits
const TAG: [u8; 2] = [0x80, 0x01];
const HEX: &[u8; 16] = b"0123456789abcdef";
const DECODE_ROWS: usize = 4096; // rows per decoder batch (a failed record costs re-decoding these)
const MAX_REDOS: usize = 64; // after this many undecodable records, the rest is left to Python

pub struct IngestArgs {
    pub input: PathBuf,
    pub out_dir: PathBuf,
    pub schema: PathBuf,
    pub fingerprint: Vec<u8>,
    pub max_message_bytes: usize,
    pub ended_branch: i8,
}

pub fn parse_args(mut it: impl Iterator<Item = String>) -> Result<IngestArgs, String> {
    let (mut input, mut out_dir, mut schema, mut fp) = (None, None, None, None);
    let mut max_message_bytes = 1024 * 1024;
    let mut ended_branch = -1i8;
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--input" => input = Some(PathBuf::from(value()?)),
            "--out-dir" => out_dir = Some(PathBuf::from(value()?)),
            "--schema" => schema = Some(PathBuf::from(value()?)),
            "--fingerprint" => fp = Some(crate::unhex(&value()?, "--fingerprint")?),
            "--max-message-bytes" => {
                max_message_bytes = value()?.parse().map_err(|_| "--max-message-bytes takes a size".to_string())?
            }
            "--ended-branch" => ended_branch = value()?.parse().map_err(|_| "--ended-branch takes a branch".to_string())?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let fingerprint = fp.ok_or("--ingest needs --fingerprint")?;
    if fingerprint.len() != 8 {
        return Err("--fingerprint is 8 bytes (hex)".into());
    }
    Ok(IngestArgs {
        input: input.ok_or("--input is required")?,
        out_dir: out_dir.ok_or("--out-dir is required")?,
        schema: schema.ok_or("--ingest needs --schema")?,
        fingerprint,
        max_message_bytes,
        ended_branch,
    })
}

/// One message: where its bytes are (a buffer of `Bufs`, as a head and a body range).
#[derive(Clone, Copy)]
struct Msg {
    i: i64,
    partition: i32,
    offset: i64,
    buf: usize,        // 0: the frame; n > 0: a decompressed Kafka batch
    head: (usize, usize), // the single-object header (10 bytes) or, for log records, the prefix in `prefixes`
    body: (usize, usize),
    prefix: Option<usize>, // log records: index into `prefixes` (magic + fingerprint of the segment)
}

struct Bufs<'a> {
    frame: &'a [u8],
    owned: Vec<Vec<u8>>,
    prefixes: Vec<[u8; 10]>,
}

impl<'a> Bufs<'a> {
    fn get(&self, buf: usize) -> &[u8] {
        if buf == 0 { self.frame } else { &self.owned[buf - 1] }
    }
    fn head(&self, m: &Msg) -> &[u8] {
        match m.prefix {
            Some(p) => &self.prefixes[p][..],
            None => &self.get(m.buf)[m.head.0..m.head.1],
        }
    }
    fn body(&self, m: &Msg) -> &[u8] {
        &self.get(m.buf)[m.body.0..m.body.1]
    }
}

fn rd<const N: usize>(d: &[u8], at: usize) -> Result<[u8; N], String> {
    d.get(at..at + N).and_then(|s| s.try_into().ok()).ok_or_else(|| "the frame is cut short".to_string())
}
fn u32le(d: &[u8], at: usize) -> Result<u32, String> { Ok(u32::from_le_bytes(rd(d, at)?)) }
fn u64le(d: &[u8], at: usize) -> Result<u64, String> { Ok(u64::from_le_bytes(rd(d, at)?)) }
fn i64le(d: &[u8], at: usize) -> Result<i64, String> { Ok(i64::from_le_bytes(rd(d, at)?)) }
fn i32le(d: &[u8], at: usize) -> Result<i32, String> { Ok(i32::from_le_bytes(rd(d, at)?)) }

struct Chunk {
    kind: u8,
    partition: i32,
    first_offset: i64,
    data: (usize, usize),
    aux: (usize, usize),
    n_records: usize,
    base: u64,
}

const CHUNK_HEADER: usize = 64;

fn chunks(frame: &[u8]) -> Result<Vec<Chunk>, String> {
    if frame.len() < 16 || &frame[..8] != MAGIC {
        return Err("not an ingest frame".into());
    }
    let n = u32le(frame, 8)? as usize;
    let mut out = Vec::with_capacity(n);
    for c in 0..n {
        let h = 16 + c * CHUNK_HEADER;
        let range = |off: u64, len: u64| -> Result<(usize, usize), String> {
            let (s, e) = (off as usize, off.checked_add(len).ok_or("a chunk range overflows")? as usize);
            if e > frame.len() || s > e {
                return Err(format!("chunk {c} runs past the frame"));
            }
            Ok((s, e))
        };
        out.push(Chunk {
            kind: *frame.get(h).ok_or("the frame is cut short")?,
            partition: i32le(frame, h + 4)?,
            first_offset: i64le(frame, h + 8)?,
            data: range(u64le(frame, h + 16)?, u64le(frame, h + 24)?)?,
            aux: range(u64le(frame, h + 32)?, u64le(frame, h + 40)?)?,
            n_records: u32le(frame, h + 48)? as usize,
            base: u64le(frame, h + 56)?,
        });
    }
    Ok(out)
}

/// The messages of a values chunk (always parseable: Python wrote the table).
fn values_chunk(c: &Chunk, no: i64, frame: &[u8], out: &mut Vec<Msg>) -> Result<usize, String> {
    let (mut pos, end) = c.data;
    for k in 0..c.n_records {
        let a = c.aux.0 + 16 * k;
        if a + 16 > c.aux.1 {
            return Err("a values chunk's table is cut short".into());
        }
        let (offset, partition, len) = (i64le(frame, a)?, i32le(frame, a + 8)?, u32le(frame, a + 12)? as usize);
        if pos + len > end {
            return Err("a values chunk's bytes are cut short".into());
        }
        let h = (pos + SOE_HEADER_LEN).min(pos + len);
        out.push(Msg { i: no << 32 | k as i64, partition, offset, buf: 0, head: (pos, h), body: (h, pos + len), prefix: None });
        pos += len;
    }
    Ok(c.n_records)
}

/// The records of a Kafka fetch (see the module comment), or None when something in it is not as
/// expected (Python then parses the chunk with the Kafka client).
fn kafka_chunk(c: &Chunk, no: i64, bufs: &mut Bufs, out: &mut Vec<Msg>) -> Option<usize> {
    let frame = bufs.frame;
    let d = &frame[c.data.0..c.data.1];
    let mut pos = 0usize;
    let mut msgs = Vec::new();
    while pos + 61 <= d.len() {
        let base_offset = i64::from_be_bytes(d[pos..pos + 8].try_into().ok()?);
        let length = i32::from_be_bytes(d[pos + 8..pos + 12].try_into().ok()?);
        if length < 49 {
            return None;
        }
        let end = pos + 12 + length as usize;
        if end > d.len() {
            break; // a partial batch at the end of a fetch: the next fetch brings it whole
        }
        if d[pos + 16] != 2 {
            return None; // an older message format
        }
        let crc = u32::from_be_bytes(d[pos + 17..pos + 21].try_into().ok()?);
        if crc32c::crc32c(&d[pos + 21..end]) != crc {
            return None; // kafka-python raises CorruptRecordError: let it
        }
        let attributes = i16::from_be_bytes(d[pos + 21..pos + 23].try_into().ok()?);
        let count = i32::from_be_bytes(d[pos + 57..pos + 61].try_into().ok()?);
        if attributes & 0x20 != 0 {
            pos = end; // a control batch (transactions): no messages
            continue;
        }
        if count < 0 {
            return None;
        }
        let (buf, rs, re) = match attributes & 0x07 {
            0 => (0, c.data.0 + pos + 61, c.data.0 + end),
            3 => {
                let mut plain = Vec::new();
                lz4_flex::frame::FrameDecoder::new(&d[pos + 61..end]).read_to_end(&mut plain).ok()?;
                let n = plain.len();
                bufs.owned.push(plain);
                (bufs.owned.len(), 0, n)
            }
            _ => return None, // gzip, snappy, zstd: not written by agentledger's producers
        };
        let data = bufs.get(buf);
        let mut p = rs;
        for _ in 0..count {
            let (len, q) = varint(data, p)?;
            if len < 0 || q + len as usize > re {
                return None;
            }
            let rend = q + len as usize;
            let (_ts, r) = varint(data, q + 1)?; // after the attributes byte
            let (delta, r) = varint(data, r)?;
            let (klen, r) = varint(data, r)?;
            let r = r + klen.max(0) as usize;
            let (vlen, r) = varint(data, r)?;
            if vlen < 0 || r + vlen as usize > rend {
                return None; // a null value: the Python path says what it is
            }
            let (vs, ve) = (r, r + vlen as usize);
            let (nh, mut r3) = varint(data, ve)?;
            for _ in 0..nh.max(0) {
                let (hk, r4) = varint(data, r3)?;
                let (hv, r5) = varint(data, r4 + hk.max(0) as usize)?;
                r3 = r5 + hv.max(0) as usize;
            }
            if r3 != rend {
                return None;
            }
            let offset = base_offset.checked_add(delta)?;
            if offset >= c.first_offset {
                let h = (vs + SOE_HEADER_LEN).min(ve);
                let k = msgs.len() as i64;
                msgs.push(Msg { i: no << 32 | k, partition: c.partition, offset, buf, head: (vs, h), body: (h, ve), prefix: None });
            }
            p = rend;
        }
        if p != re {
            return None;
        }
        pos = end;
    }
    let n = msgs.len();
    out.extend(msgs);
    Some(n)
}

/// The records of an embedded-log chunk; None for a record whose block is not exactly one record
/// followed by the sync marker (`pun` collects those: Python reads them and names the damage).
fn log_chunk(c: &Chunk, no: i64, bufs: &mut Bufs, out: &mut Vec<Msg>, punt: &mut Vec<i64>) -> Result<usize, String> {
    let aux = &bufs.frame[c.aux.0..c.aux.1];
    let n = c.n_records;
    if aux.len() != 8 * (n + 1) + 16 + 10 {
        return Err("a log chunk's table has the wrong size".into());
    }
    let sync: [u8; 16] = aux[8 * (n + 1)..8 * (n + 1) + 16].try_into().unwrap();
    let prefix: [u8; 10] = aux[8 * (n + 1) + 16..].try_into().unwrap();
    bufs.prefixes.push(prefix);
    let pi = bufs.prefixes.len() - 1;
    let data = &bufs.frame[c.data.0..c.data.1];
    for k in 0..n {
        let i = no << 32 | k as i64;
        let s = u64le(aux, 8 * k)?.wrapping_sub(c.base) as usize;
        let e = u64le(aux, 8 * (k + 1))?.wrapping_sub(c.base) as usize;
        let body = (|| {
            if s >= data.len() || e > data.len() || s >= e || data[s] != 0x02 {
                return None;
            }
            let (size, p) = varint(data, s + 1)?;
            if size < 0 {
                return None;
            }
            let stop = p + size as usize;
            if stop + 16 != e || data[stop..e] != sync[..] {
                return None; // (also a block followed by bytes before the next record: Python says why)
            }
            Some((c.data.0 + p, c.data.0 + stop))
        })();
        match body {
            Some(b) => out.push(Msg { i, partition: c.partition, offset: c.first_offset + k as i64, buf: 0, head: (0, 0), body: b, prefix: Some(pi) }),
            None => punt.push(i),
        }
    }
    Ok(n)
}

fn hex64(digest: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    for (i, b) in digest.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 15) as usize];
    }
    out
}

/// The checks of `_precheck` that pass: header, size, fingerprint, tag and hash.
fn sound(bufs: &Bufs, m: &Msg, fp: &[u8], max_len: usize) -> bool {
    let (head, body) = (bufs.head(m), bufs.body(m));
    let len = head.len() + body.len();
    if head.len() != SOE_HEADER_LEN || len < SOE_HEADER_LEN + HASH_FIELD_LEN || len > max_len {
        return false;
    }
    if head[..2] != SOE || &head[2..] != fp {
        return false;
    }
    let cut = body.len() - HASH_FIELD_LEN;
    if body[cut..cut + 2] != TAG {
        return false;
    }
    let mut h = Sha256::new();
    h.update(head);
    h.update(&body[..cut]);
    hex64(&h.finalize())[..] == body[cut + 2..]
}

pub fn run(args: IngestArgs) -> Result<String, String> {
    let t0 = std::time::Instant::now();
    let timings = std::env::var_os("AGENTLEDGER_AVRO2ARROW_TIMINGS").is_some();
    let tick = |what: &str| if timings { eprintln!("ingest {what} {:?}", t0.elapsed()) };
    let mut raw = Vec::new();
    File::open(&args.input)
        .and_then(|mut f| f.read_to_end(&mut raw))
        .map_err(|e| format!("cannot read {}: {e}", args.input.display()))?;
    let frame: &[u8] = &raw;
    let mut schema_json = String::new();
    File::open(&args.schema)
        .and_then(|mut f| f.read_to_string(&mut schema_json))
        .map_err(|e| format!("cannot read the schema {}: {e}", args.schema.display()))?;

    let mut bufs = Bufs { frame, owned: Vec::new(), prefixes: Vec::new() };
    let mut msgs = Vec::new();
    let mut punt: Vec<i64> = Vec::new();
    let mut per_chunk: Vec<i64> = Vec::new();
    for (no, c) in chunks(frame)?.iter().enumerate() {
        let no = no as i64;
        let n = match c.kind {
            0 => Some(values_chunk(c, no, frame, &mut msgs)?),
            1 => kafka_chunk(c, no, &mut bufs, &mut msgs),
            2 => Some(log_chunk(c, no, &mut bufs, &mut msgs, &mut punt)?),
            k => return Err(format!("unknown chunk kind {k}")),
        };
        per_chunk.push(n.map_or(-1, |n| n as i64));
    }
    let records = msgs.len() + punt.len();
    tick("read+chunks");

    // the byte checks (two threads: SHA-256 is most of it)
    let fp = args.fingerprint.clone();
    let mut ok = vec![false; msgs.len()];
    {
        let half = msgs.len() / 2;
        let (a, b) = ok.split_at_mut(half);
        let (ma, mb) = msgs.split_at(half);
        let bufs = &bufs;
        let (fp, max) = (&fp, args.max_message_bytes);
        std::thread::scope(|s| {
            s.spawn(move || a.iter_mut().zip(ma).for_each(|(o, m)| *o = sound(bufs, m, fp, max)));
            b.iter_mut().zip(mb).for_each(|(o, m)| *o = sound(bufs, m, fp, max));
        });
    }

    tick("byte checks");
    // decoding, one datum per message
    let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Rabin);
    let got = store.register(AvroSchema::new(schema_json)).map_err(|e| format!("the schema: {e}"))?;
    let want = Fingerprint::Rabin(u64::from_le_bytes(fp[..].try_into().unwrap()));
    let candidates: Vec<usize> = if got == want { (0..msgs.len()).filter(|&j| ok[j]).collect() } else { Vec::new() };
    let builder = || {
        ReaderBuilder::new()
            .with_batch_size(DECODE_ROWS)
            .with_writer_schema_store(store.clone())
            .with_active_fingerprint(want)
            .with_decoder_mode(DecoderMode::UnframedDatum)
            .build_decoder()
            .map_err(|e| format!("cannot make a decoder: {e}"))
    };
    let mut batches: Vec<(RecordBatch, Vec<usize>)> = Vec::new(); // rows and the message of each row
    let mut redos = 0usize;
    let mut vouched = vec![false; msgs.len()];
    for part in candidates.chunks(DECODE_ROWS) {
        let mut todo: Vec<usize> = part.to_vec();
        loop {
            let mut dec = builder()?;
            let mut rows = Vec::with_capacity(todo.len());
            let mut failed = None;
            for &j in &todo {
                let body = bufs.body(&msgs[j]);
                match dec.decode(body) {
                    Ok(n) => {
                        rows.push(j);
                        vouched[j] = n == body.len(); // a body that decodes short is not vouched for
                    }
                    Err(_) => {
                        failed = Some(j);
                        break;
                    }
                }
            }
            match failed {
                None => {
                    if let Some(b) = dec.flush().map_err(|e| format!("cannot decode: {e}"))? {
                        if b.num_rows() != rows.len() {
                            return Err("the decoder returned another number of rows".into());
                        }
                        batches.push((b, rows));
                    }
                    break;
                }
                Some(j) => {
                    // the decoder's half-written row cannot be taken back: decode the others again
                    redos += 1;
                    if redos > MAX_REDOS {
                        todo.clear();
                        break;
                    }
                    todo.retain(|&x| x != j);
                }
            }
        }
    }
    if redos > MAX_REDOS {
        // (the rows decoded before stay vouched; everything after the cap is left to Python)
        let done: HashSet<usize> = batches.iter().flat_map(|(_, r)| r.iter().copied()).collect();
        for j in 0..msgs.len() {
            if !done.contains(&j) {
                vouched[j] = false;
            }
        }
    }

    tick("decoded");
    let out = split(&batches, &msgs, &bufs, &mut vouched, args.ended_branch)?;
    tick("split");
    for (j, m) in msgs.iter().enumerate() {
        if !vouched[j] {
            punt.push(m.i);
        }
    }
    punt.sort_unstable();
    write_all(&args.out_dir, &out, &punt)?;
    tick("written");
    let kinds: Vec<String> = out.kinds.iter().map(|(t, (_, b))| format!("\"{t}\":{}", b.iter().map(|x| x.num_rows()).sum::<usize>())).collect();
    let chunks: Vec<String> = per_chunk.iter().map(|n| n.to_string()).collect();
    Ok(format!(
        "{{\"records\":{records},\"rows\":{},\"punted\":{},\"chunks\":[{}],\"kinds\":{{{}}},\"dup_event_ids\":{}}}",
        out.rows,
        punt.len(),
        chunks.join(","),
        kinds.join(","),
        out.dup_event_ids
    ))
}

struct Output {
    rows: usize,
    kinds: BTreeMap<i8, (SchemaRef, Vec<RecordBatch>)>,
    env: Vec<RecordBatch>,
    sessions: RecordBatch,
    dup_event_ids: bool,
}

#[derive(Default)]
struct Sess {
    n: i64,
    first_seq: i64,
    first_prev: String,
    last_seq: i64,
    last_hash: String,
    first_at: i64,
    last_at: i64,
    ended: bool,
    linked: bool,
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T, String> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| format!("the decoded events have no {name} column of the expected type"))
}

/// Split the decoded rows by kind (vouched rows only, their hash checked against the bytes), and
/// make the chain guard's tables.
fn split(batches: &[(RecordBatch, Vec<usize>)], msgs: &[Msg], bufs: &Bufs, vouched: &mut [bool], ended: i8) -> Result<Output, String> {
    let mut kinds: BTreeMap<i8, (SchemaRef, Vec<RecordBatch>)> = BTreeMap::new();
    let mut env = Vec::new();
    let mut rows_total = 0usize;
    let mut sessions: HashMap<String, Sess> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut ids: HashSet<String> = HashSet::new();
    let mut dup = false;
    let env_schema = Arc::new(Schema::new(vec![
        Field::new("_i", DataType::Int64, false),
        Field::new("session_id", DataType::Utf8, false),
        Field::new("seq", DataType::Int64, false),
        Field::new("prev_hash", DataType::Utf8, false),
        Field::new("hash", DataType::Utf8, false),
        Field::new("event_id", DataType::Utf8, false),
        Field::new("occurred_at", DataType::Timestamp(TimeUnit::Microsecond, None), false),
        Field::new("branch", DataType::Int8, false),
    ]));
    for (batch, rows) in batches {
        let schema = batch.schema();
        let payload_at = schema.index_of("payload").map_err(|_| "the schema has no payload field")?;
        let branches = match schema.field(payload_at).data_type() {
            DataType::Union(f, _) => f.clone(),
            other => return Err(format!("the payload field is {other}, not a union of event kinds")),
        };
        let union = batch.column(payload_at).as_any().downcast_ref::<UnionArray>().ok_or("the payload is not a union")?;
        let hash = col::<StringArray>(batch, "hash")?;
        let sid = col::<StringArray>(batch, "session_id")?;
        let seq = col::<Int64Array>(batch, "seq")?;
        let prev = col::<StringArray>(batch, "prev_hash")?;
        let eid = col::<StringArray>(batch, "event_id")?;
        let at = col::<TimestampMicrosecondArray>(batch, "occurred_at")?;
        // the rows to keep: vouched, and the decoded hash is the one the bytes carry
        let mut keep: Vec<u32> = Vec::new();
        for (r, &j) in rows.iter().enumerate() {
            if vouched[j] {
                let body = bufs.body(&msgs[j]);
                let claimed = &body[body.len() - 64..];
                let ok = hash.is_valid(r) && hash.value(r).as_bytes() == claimed
                    && !sid.is_null(r) && !seq.is_null(r) && !prev.is_null(r) && !eid.is_null(r) && !at.is_null(r);
                vouched[j] = ok;
                if ok {
                    keep.push(r as u32);
                }
            }
        }
        if keep.is_empty() {
            continue;
        }
        let keep_idx = UInt32Array::from(keep.clone());
        let sel = |a: &ArrayRef| take(a.as_ref(), &keep_idx, None).map_err(|e| e.to_string());
        let i_col = Int64Array::from(keep.iter().map(|&r| msgs[rows[r as usize]].i).collect::<Vec<_>>());
        let part_col = Int32Array::from(keep.iter().map(|&r| msgs[rows[r as usize]].partition).collect::<Vec<_>>());
        let off_col = Int64Array::from(keep.iter().map(|&r| msgs[rows[r as usize]].offset).collect::<Vec<_>>());
        let type_ids = union.type_ids();
        let offsets = union.offsets().ok_or("the payload union is not dense")?;
        let branch_col = Int8Array::from(keep.iter().map(|&r| type_ids[r as usize]).collect::<Vec<_>>());
        // the chain guard's view of these rows, and the per-session summary, in message order
        env.push(
            RecordBatch::try_new(env_schema.clone(), vec![
                Arc::new(i_col.clone()),
                sel(batch.column_by_name("session_id").unwrap())?,
                sel(batch.column_by_name("seq").unwrap())?,
                sel(batch.column_by_name("prev_hash").unwrap())?,
                sel(batch.column_by_name("hash").unwrap())?,
                sel(batch.column_by_name("event_id").unwrap())?,
                sel(batch.column_by_name("occurred_at").unwrap())?,
                Arc::new(branch_col),
            ]).map_err(|e| e.to_string())?,
        );
        for &r in &keep {
            let r = r as usize;
            let id = eid.value(r);
            if !dup && !ids.insert(id.to_string()) {
                dup = true;
            }
            let s = sid.value(r);
            let (q, p, h, t) = (seq.value(r), prev.value(r), hash.value(r), at.value(r));
            let e = type_ids[r] == ended;
            match sessions.get_mut(s) {
                None => {
                    order.push(s.to_string());
                    sessions.insert(s.to_string(), Sess {
                        n: 1, first_seq: q, first_prev: p.to_string(), last_seq: q, last_hash: h.to_string(),
                        first_at: t, last_at: t, ended: e, linked: true,
                    });
                }
                Some(x) => {
                    x.linked = x.linked && x.last_seq.checked_add(1) == Some(q) && x.last_hash == p;
                    x.n += 1;
                    x.last_seq = q;
                    x.last_hash = h.to_string();
                    x.first_at = x.first_at.min(t);
                    x.last_at = x.last_at.max(t);
                    x.ended |= e;
                }
            }
        }
        // by kind
        let envelope: Vec<usize> = (0..schema.fields().len()).filter(|&c| c != payload_at).collect();
        let mut by: BTreeMap<i8, (Vec<u32>, Vec<u32>, Vec<u32>)> = BTreeMap::new(); // rows, child offsets, positions in keep
        for (kpos, &r) in keep.iter().enumerate() {
            let t = type_ids[r as usize];
            let e = by.entry(t).or_default();
            e.0.push(r);
            e.1.push(offsets[r as usize] as u32);
            e.2.push(kpos as u32);
        }
        for (t, (at_rows, child_at, kpos)) in by {
            let at_rows = UInt32Array::from(at_rows);
            let kpos = UInt32Array::from(kpos);
            let mut cols: Vec<ArrayRef> = Vec::with_capacity(envelope.len() + 4);
            for &c in &envelope {
                cols.push(plain(take(batch.column(c).as_ref(), &at_rows, None).map_err(|e| e.to_string())?)?);
            }
            cols.push(plain(take(union.child(t).as_ref(), &UInt32Array::from(child_at), None).map_err(|e| e.to_string())?)?);
            for a in [&i_col as &dyn Array, &part_col, &off_col] {
                cols.push(take(a, &kpos, None).map_err(|e| e.to_string())?);
            }
            if !kinds.contains_key(&t) {
                let (_, branch) = branches.iter().find(|(id, _)| *id == t).ok_or_else(|| format!("union branch {t} is not in the schema"))?;
                let mut fields: Vec<Field> = envelope.iter().map(|&c| plain_field(schema.field(c))).collect();
                fields.push(plain_field(branch).with_name("payload"));
                fields.push(Field::new("_i", DataType::Int64, false));
                fields.push(Field::new("source_partition", DataType::Int32, false));
                fields.push(Field::new("source_offset", DataType::Int64, false));
                kinds.insert(t, (Arc::new(Schema::new(fields)), Vec::new()));
            }
            let (ks, kb) = kinds.get_mut(&t).unwrap();
            kb.push(RecordBatch::try_new(ks.clone(), cols).map_err(|e| e.to_string())?);
        }
        rows_total += keep.len();
    }
    // sessions
    let mut b_sid = StringBuilder::new();
    let (mut b_n, mut b_fs, mut b_ls) = (Int64Builder::new(), Int64Builder::new(), Int64Builder::new());
    let (mut b_fp, mut b_lh) = (StringBuilder::new(), StringBuilder::new());
    let (mut b_fa, mut b_la) = (TimestampMicrosecondBuilder::new(), TimestampMicrosecondBuilder::new());
    let (mut b_end, mut b_link) = (BooleanBuilder::new(), BooleanBuilder::new());
    for s in &order {
        let x = &sessions[s];
        b_sid.append_value(s);
        b_n.append_value(x.n);
        b_fs.append_value(x.first_seq);
        b_fp.append_value(&x.first_prev);
        b_ls.append_value(x.last_seq);
        b_lh.append_value(&x.last_hash);
        b_fa.append_value(x.first_at);
        b_la.append_value(x.last_at);
        b_end.append_value(x.ended);
        b_link.append_value(x.linked);
    }
    let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
    let sessions = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("session_id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
            Field::new("first_seq", DataType::Int64, false),
            Field::new("first_prev", DataType::Utf8, false),
            Field::new("last_seq", DataType::Int64, false),
            Field::new("last_hash", DataType::Utf8, false),
            Field::new("first_at", ts.clone(), false),
            Field::new("last_at", ts, false),
            Field::new("ended", DataType::Boolean, false),
            Field::new("linked", DataType::Boolean, false),
        ])),
        vec![
            Arc::new(b_sid.finish()), Arc::new(b_n.finish()), Arc::new(b_fs.finish()), Arc::new(b_fp.finish()),
            Arc::new(b_ls.finish()), Arc::new(b_lh.finish()), Arc::new(b_fa.finish()), Arc::new(b_la.finish()),
            Arc::new(b_end.finish()), Arc::new(b_link.finish()),
        ],
    ).map_err(|e| e.to_string())?;
    if env.is_empty() {
        env.push(RecordBatch::new_empty(env_schema));
    }
    Ok(Output { rows: rows_total, kinds, env, sessions, dup_event_ids: dup })
}

fn write_ipc(path: &Path, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<(), String> {
    let file = File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut w = FileWriter::try_new(BufWriter::with_capacity(1 << 20, file), schema).map_err(|e| e.to_string())?;
    for b in batches {
        w.write(b).map_err(|e| e.to_string())?;
    }
    w.finish().map_err(|e| e.to_string())
}

fn write_all(dir: &Path, out: &Output, punt: &[i64]) -> Result<(), String> {
    for (t, (schema, batches)) in &out.kinds {
        write_ipc(&dir.join(format!("kind-{t}.arrow")), schema, batches)?;
    }
    write_ipc(&dir.join("env.arrow"), &out.env[0].schema(), &out.env)?;
    write_ipc(&dir.join("sessions.arrow"), &out.sessions.schema(), std::slice::from_ref(&out.sessions))?;
    let mut f = BufWriter::new(File::create(dir.join("punted.bin")).map_err(|e| format!("cannot write punted.bin: {e}"))?);
    for i in punt {
        f.write_all(&i.to_le_bytes()).map_err(|e| format!("cannot write punted.bin: {e}"))?;
    }
    f.flush().map_err(|e| format!("cannot write punted.bin: {e}"))
}
