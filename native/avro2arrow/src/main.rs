//! agentledger-avro2arrow: decode an agentledger evidence bundle (a standard Avro object container
//! file of the event schema) into Arrow IPC files, one per event kind, for `agentledger replay`.
//!
//! The event schema is a record whose `payload` field is a union of one record per event kind.
//! Each output file `kind-<branch>.arrow` holds the events of one union branch, in file order:
//! every top-level field of the event except `payload`, then `payload` as that branch's record.
//! Splitting by kind keeps every column dense (no column of mostly-null structs), which is what
//! makes loading them into DuckDB cheap.
//!
//! Decoding is done by arrow-avro (the Apache Arrow project's Avro reader), which checks the
//! container's sync markers and block framing itself.
//!
//! With `--verify`, a second thread meanwhile frames the container's blocks (a bundle holds one
//! event per block) and checks the hash chain over the raw bytes, exactly as the fast path of
//! `replay.chain.verify_spans` does: each event's SHA-256 over its single-object encoding up to the
//! hash field equals its hash, its prev_hash is the previous event's hash, the session id is the
//! same and seq counts up by one. It only ever vouches for a bundle that is sound throughout:
//! at the first thing that is not as expected (damage, or just an unusual encoding) it stops and
//! says so, and agentledger's own verifier works out what is wrong and where. The block spans go
//! to `--spans-out` as little-endian i64 pairs (body start, body end).
//!
//! The same binary decodes ingest batches: `agentledger-avro2arrow --ingest ...` (src/ingest.rs).
//!
//! Usage: agentledger-avro2arrow --input FILE|- --out-dir DIR [--reader-schema FILE] [--batch-size N]
//!          [--verify --blocks-at OFFSET --sync HEX --soe-header HEX --session-id ID
//!           --first-seq N --first-prev-hash HASH --spans-out FILE]
//! On success prints a JSON line {"kind": <branch>, "rows": n} as each kind's file is complete,
//! then one with the summary: {"rows": N, "kinds": {"<branch>": rows, ...}[, "verify": {...}]}.
//! On failure prints the reason on stderr and exits 2. With AGENTLEDGER_AVRO2ARROW_TIMINGS set, the
//! time of each phase goes to stderr (for docs/replay.md's breakdown).

mod ingest;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Cursor, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use arrow_array::types::Int32Type;
use arrow_array::{Array, ArrayRef, DictionaryArray, ListArray, RecordBatch, StructArray, UInt32Array, UnionArray};
use arrow_avro::reader::ReaderBuilder;
use arrow_avro::schema::AvroSchema;
use arrow_ipc::writer::FileWriter;
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use arrow_select::take::take;
use sha2::{Digest, Sha256};

/// The type with every dictionary (how arrow-avro decodes an Avro enum) replaced by its values'
/// type, so that the columns load into DuckDB as the warehouse's VARCHAR with no cast there.
fn plain_type(dt: &DataType) -> DataType {
    match dt {
        DataType::Dictionary(_, values) => plain_type(values),
        DataType::Struct(fields) => DataType::Struct(fields.iter().map(|f| plain_field(f)).collect()),
        DataType::List(f) => DataType::List(Arc::new(plain_field(f))),
        DataType::LargeList(f) => DataType::LargeList(Arc::new(plain_field(f))),
        DataType::Map(f, sorted) => DataType::Map(Arc::new(plain_field(f)), *sorted),
        other => other.clone(),
    }
}

fn plain_field(f: &Field) -> Field {
    f.clone().with_data_type(plain_type(f.data_type()))
}

fn plain(a: ArrayRef) -> Result<ArrayRef, String> {
    let err = |e: arrow_schema::ArrowError| format!("cannot unpack the enums of a {}: {e}", a.data_type());
    match a.data_type() {
        DataType::Dictionary(_, _) => {
            let d = a
                .as_any()
                .downcast_ref::<DictionaryArray<Int32Type>>()
                .ok_or_else(|| format!("an enum decoded as {}, not with Int32 keys", a.data_type()))?;
            take(plain(d.values().clone())?.as_ref(), d.keys(), None).map_err(err)
        }
        DataType::Struct(_) => {
            let (fields, columns, nulls) = a.as_any().downcast_ref::<StructArray>().expect("a struct").clone().into_parts();
            let columns = columns.into_iter().map(plain).collect::<Result<Vec<_>, _>>()?;
            let fields: Fields = fields
                .iter()
                .zip(&columns)
                .map(|(f, c)| f.as_ref().clone().with_data_type(c.data_type().clone()))
                .collect();
            Ok(Arc::new(StructArray::try_new(fields, columns, nulls).map_err(err)?))
        }
        DataType::List(_) => {
            let (field, offsets, values, nulls) = a.as_any().downcast_ref::<ListArray>().expect("a list").clone().into_parts();
            let values = plain(values)?;
            let field = Arc::new(field.as_ref().clone().with_data_type(values.data_type().clone()));
            Ok(Arc::new(ListArray::try_new(field, offsets, values, nulls).map_err(err)?))
        }
        DataType::LargeList(_) | DataType::Map(_, _) if &plain_type(a.data_type()) != a.data_type() => {
            Err(format!("cannot unpack the enums inside a {}", a.data_type()))
        }
        _ => Ok(a),
    }
}

struct Args {
    input: String,
    out_dir: PathBuf,
    reader_schema: Option<PathBuf>,
    batch_size: usize,
    verify: Option<VerifyArgs>,
}

#[derive(Default)]
struct VerifyArgs {
    blocks_at: usize,
    sync: Vec<u8>,
    soe_header: Vec<u8>,
    session_id: Vec<u8>,
    first_seq: i64,
    first_prev_hash: Vec<u8>,
    spans_out: PathBuf,
}

fn unhex(s: &str, what: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return Err(format!("{what} is not hex"));
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("{what} is not hex")),
    };
    b.chunks(2).map(|p| Ok(nib(p[0])? << 4 | nib(p[1])?)).collect()
}

fn parse_args() -> Result<Args, String> {
    let mut input = None;
    let mut out_dir = None;
    let mut reader_schema = None;
    let mut batch_size = 65_536usize;
    let mut verify = false;
    let mut v = VerifyArgs::default();
    let mut spans_out = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--input" => input = Some(value()?),
            "--out-dir" => out_dir = Some(PathBuf::from(value()?)),
            "--reader-schema" => reader_schema = Some(PathBuf::from(value()?)),
            "--batch-size" => {
                batch_size = value()?.parse().map_err(|_| "--batch-size takes a positive integer".to_string())?
            }
            "--verify" => verify = true,
            "--blocks-at" => v.blocks_at = value()?.parse().map_err(|_| "--blocks-at takes an offset".to_string())?,
            "--sync" => v.sync = unhex(&value()?, "--sync")?,
            "--soe-header" => v.soe_header = unhex(&value()?, "--soe-header")?,
            "--session-id" => v.session_id = value()?.into_bytes(),
            "--first-seq" => v.first_seq = value()?.parse().map_err(|_| "--first-seq takes an integer".to_string())?,
            "--first-prev-hash" => v.first_prev_hash = value()?.into_bytes(),
            "--spans-out" => spans_out = Some(PathBuf::from(value()?)),
            "--version" => {
                println!("agentledger-avro2arrow {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if batch_size == 0 {
        return Err("--batch-size takes a positive integer".into());
    }
    let verify = if verify {
        if v.sync.len() != 16 {
            return Err("--verify needs --sync (16 bytes, hex)".into());
        }
        v.spans_out = spans_out.ok_or("--verify needs --spans-out")?;
        Some(v)
    } else {
        None
    };
    Ok(Args {
        input: input.ok_or("--input is required")?,
        out_dir: out_dir.ok_or("--out-dir is required")?,
        reader_schema,
        batch_size,
        verify,
    })
}

fn run(args: Args) -> Result<String, String> {
    let mut data = Vec::new();
    if args.input == "-" {
        std::io::stdin().lock().read_to_end(&mut data).map_err(|e| format!("cannot read stdin: {e}"))?;
    } else {
        File::open(&args.input)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(|e| format!("cannot read {}: {e}", args.input))?;
    }
    let data: &[u8] = Vec::leak(data); // (freed when the process ends, see write_kinds' caller)
    let t0 = std::time::Instant::now();
    let timings = std::env::var_os("AGENTLEDGER_AVRO2ARROW_TIMINGS").is_some();
    let framing = args.verify.as_ref().map(|v| frame(data, v));
    if timings { eprintln!("read+frame {:?}", t0.elapsed()); }
    // With sound framing, the blocks are decoded in two halves on two threads (the container's
    // header before each), and their output joined in file order.
    let parts: Vec<(&[u8], &[u8])> = match (&args.verify, &framing) {
        (Some(v), Some(f)) if f.ok && f.block_starts.len() >= 2 * SPLIT_MIN_EVENTS => {
            let mid = f.block_starts[f.block_starts.len() / 2];
            let header = &data[..v.blocks_at];
            vec![(header, &data[v.blocks_at..mid]), (header, &data[mid..])]
        }
        _ => Vec::new(),
    };
    fn reader<'a>((header, blocks): (&'a [u8], &'a [u8])) -> impl BufRead + 'a {
        BufReader::with_capacity(1 << 20, header.chain(blocks))
    }
    std::thread::scope(|scope| {
        let verifying = match (&args.verify, &framing) {
            (Some(v), Some(f)) => Some(scope.spawn(move || {
                let r = verify(data, v, f);
                if timings { eprintln!("verified {:?}", t0.elapsed()); }
                r
            })),
            _ => None,
        };
        let decoded = if parts.is_empty() {
            vec![decode(Cursor::new(data), &args)?]
        } else {
            let (first, args) = (parts[0], &args);
            let first = scope.spawn(move || decode(reader(first), args));
            let second = decode(reader(parts[1]), args)?;
            vec![first.join().map_err(|_| "a decoding thread panicked".to_string())??, second]
        };
        if timings { eprintln!("decoded {:?}", t0.elapsed()); }
        let summary = write_kinds(&decoded, &args)?;
        // The process ends right after this: the kernel takes the memory back faster than freeing
        // each buffer would.
        std::mem::forget(decoded);
        if timings { eprintln!("written {:?}", t0.elapsed()); }
        match verifying {
            None => Ok(summary),
            Some(h) => {
                let v = h.join().map_err(|_| "the verifying thread panicked".to_string())??;
                Ok(format!("{},\"verify\":{v}}}", &summary[..summary.len() - 1]))
            }
        }
    })
}

const SPLIT_MIN_EVENTS: usize = 50_000;

/// A zigzag varint at ``pos`` of ``data``: (value, position after it), or None when it runs off
/// the end or is longer than a long's.
fn varint(data: &[u8], mut pos: usize) -> Option<(i64, usize)> {
    let mut acc: u64 = 0;
    let mut shift = 0;
    loop {
        let b = *data.get(pos)?;
        pos += 1;
        if shift == 63 && b > 1 {
            return None; // more than 64 bits: Python reads a bigger number than this could hold
        }
        acc |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Some((((acc >> 1) as i64) ^ -((acc & 1) as i64), pos));
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

const TAG: &[u8; 2] = b"\x80\x01"; // an Avro string of 64 bytes: the prev_hash and hash fields
const HEX: &[u8; 16] = b"0123456789abcdef";

struct Framing {
    spans: Vec<(usize, usize)>, // (body start, body end) of each one-record block
    block_starts: Vec<usize>,
    ok: bool,
}

/// The blocks from ``blocks_at`` on, as `replay.bundle.frame_blocks` frames them; stops at the
/// first block that is not one record of positive size followed by the sync marker.
fn frame(data: &[u8], v: &VerifyArgs) -> Framing {
    let mut f = Framing { spans: Vec::new(), block_starts: Vec::new(), ok: v.blocks_at <= data.len() };
    let mut pos = v.blocks_at;
    let n = data.len();
    while f.ok && pos < n {
        // every block of a bundle holds one record: count 1 (zigzag 2), then the size, the body, the sync
        f.ok = data[pos] == 0x02
            && match varint(data, pos + 1) {
                Some((size, p)) if size > 0 && (size as u64) < n as u64 => {
                    let end = p + size as usize;
                    if end + 16 <= n && data[end..end + 16] == v.sync[..] {
                        f.spans.push((p, end));
                        f.block_starts.push(pos);
                        pos = end + 16;
                        true
                    } else {
                        false
                    }
                }
                _ => false,
            };
    }
    f
}

/// Check the chain over the framed blocks (see the module comment). Returns the JSON of the result.
fn verify(data: &[u8], v: &VerifyArgs, f: &Framing) -> Result<String, String> {
    let spans = &f.spans;
    let framing_ok = f.ok;
    let mut out = BufWriter::new(
        File::create(&v.spans_out).map_err(|e| format!("cannot create {}: {e}", v.spans_out.display()))?,
    );
    for &(s, e) in spans {
        out.write_all(&(s as i64).to_le_bytes()).and_then(|_| out.write_all(&(e as i64).to_le_bytes()))
            .map_err(|e| format!("cannot write the spans: {e}"))?;
    }
    out.flush().map_err(|e| format!("cannot write the spans: {e}"))?;

    let mut prev: Vec<u8> = v.first_prev_hash.clone();
    let mut expected = v.first_seq;
    let mut verified = 0usize;
    let mut chain_ok = prev.len() == 64;
    let mut hexd = [0u8; 64];
    if chain_ok {
        for &(s, e) in spans {
            if e < s + 132 + 3 {
                chain_ok = false;
                break;
            }
            let mut h = Sha256::new();
            h.update(&v.soe_header);
            h.update(&data[s..e - 66]);
            for (i, b) in h.finalize().iter().enumerate() {
                hexd[2 * i] = HEX[(b >> 4) as usize];
                hexd[2 * i + 1] = HEX[(b & 15) as usize];
            }
            let claimed = &data[e - 64..e];
            if hexd[..] != claimed[..] || &data[e - 66..e - 64] != TAG || &data[e - 132..e - 130] != TAG
                || data[e - 130..e - 66] != prev[..]
            {
                chain_ok = false;
                break;
            }
            // the envelope head: event_id and session_id (one-byte lengths), then seq
            let n1 = data[s];
            if n1 & 0x80 != 0 {
                chain_ok = false;
                break;
            }
            let p = s + 1 + (n1 >> 1) as usize;
            let n2 = match data.get(p) {
                Some(&b) if b & 0x80 == 0 && p < e => b,
                _ => {
                    chain_ok = false;
                    break;
                }
            };
            let p = p + 1;
            let len = (n2 >> 1) as usize;
            if p + len > e || len != v.session_id.len() || data[p..p + len] != v.session_id[..] {
                chain_ok = false;
                break;
            }
            match varint(data, p + len) {
                Some((seq, q)) if q <= e && seq == expected => {}
                _ => {
                    chain_ok = false;
                    break;
                }
            }
            expected = match expected.checked_add(1) {
                Some(next) => next,
                None => {
                    chain_ok = false; // (Python counts on past i64: not vouched for)
                    break;
                }
            };
            prev.clear();
            prev.extend_from_slice(claimed);
            verified += 1;
        }
    }
    // An empty chain is never vouched for (its head is the first prev hash; Python says so).
    let head_hash = String::from_utf8_lossy(&prev).into_owned();
    let chain_ok = chain_ok && verified > 0 && verified == spans.len();
    let head_seq = expected.checked_sub(1).unwrap_or(i64::MIN);
    Ok(format!(
        "{{\"events\":{},\"framing_ok\":{},\"chain_ok\":{},\"verified\":{},\"head_seq\":{},\"head_hash\":\"{}\"}}",
        spans.len(),
        framing_ok,
        chain_ok,
        verified,
        head_seq,
        head_hash
    ))
}

/// The events of one container, split by kind: (rows, {branch: (schema, batches)}).
type ByKind = (usize, BTreeMap<i8, (SchemaRef, Vec<RecordBatch>)>);

/// Decode a container and split its events by kind (see the module comment).
fn decode<R: BufRead>(input: R, args: &Args) -> Result<ByKind, String> {
    let mut builder = ReaderBuilder::new().with_batch_size(args.batch_size);
    if let Some(path) = &args.reader_schema {
        let mut json = String::new();
        File::open(path)
            .and_then(|mut f| f.read_to_string(&mut json))
            .map_err(|e| format!("cannot read the reader schema {}: {e}", path.display()))?;
        builder = builder.with_reader_schema(AvroSchema::new(json));
    }
    let reader = builder.build(input).map_err(|e| format!("not a readable Avro container: {e}"))?;
    let schema = reader.schema();
    let payload_at = schema
        .fields()
        .iter()
        .position(|f| f.name() == "payload")
        .ok_or("the schema has no payload field: not an agentledger event schema")?;
    let branches = match schema.field(payload_at).data_type() {
        DataType::Union(fields, _) => fields.clone(),
        other => return Err(format!("the payload field is {other}, not a union of event kinds")),
    };
    let envelope: Vec<usize> = (0..schema.fields().len()).filter(|&i| i != payload_at).collect();

    let mut out: BTreeMap<i8, (SchemaRef, Vec<RecordBatch>)> = BTreeMap::new();
    let mut total = 0usize;
    for batch in reader {
        let batch = batch.map_err(|e| format!("cannot decode event {}: {e}", total))?;
        let union = batch
            .column(payload_at)
            .as_any()
            .downcast_ref::<UnionArray>()
            .ok_or("the payload column is not a union array")?;
        let type_ids = union.type_ids();
        let offsets = union.offsets().ok_or("the payload union is not dense")?;
        // The rows and the child offsets of each branch, in one pass over the batch.
        let mut rows: BTreeMap<i8, (Vec<u32>, Vec<u32>)> = BTreeMap::new();
        for (i, (&t, &o)) in type_ids.iter().zip(offsets.iter()).enumerate() {
            let e = rows.entry(t).or_default();
            e.0.push(i as u32);
            e.1.push(o as u32);
        }
        for (t, (at, child_at)) in rows {
            let at = UInt32Array::from(at);
            let mut cols: Vec<ArrayRef> = Vec::with_capacity(envelope.len() + 1);
            for &i in &envelope {
                cols.push(plain(take(batch.column(i).as_ref(), &at, None).map_err(|e| e.to_string())?)?);
            }
            // A dense union's child holds its rows in order: then it is the column as it is.
            let child = union.child(t);
            let in_order = child_at.len() == child.len() && child_at.iter().enumerate().all(|(i, &o)| o as usize == i);
            let payload = if in_order {
                child.clone()
            } else {
                take(child.as_ref(), &UInt32Array::from(child_at), None).map_err(|e| e.to_string())?
            };
            cols.push(plain(payload)?);
            if !out.contains_key(&t) {
                let (_, branch) = branches
                    .iter()
                    .find(|(id, _)| *id == t)
                    .ok_or_else(|| format!("union branch {t} is not in the schema"))?;
                let mut fields: Vec<Field> = envelope.iter().map(|&i| plain_field(schema.field(i))).collect();
                fields.push(plain_field(branch).with_name("payload"));
                out.insert(t, (Arc::new(Schema::new(fields)), Vec::new()));
            }
            let (kind_schema, batches) = out.get_mut(&t).expect("inserted above");
            batches.push(RecordBatch::try_new(kind_schema.clone(), cols).map_err(|e| e.to_string())?);
        }
        total += batch.num_rows();
    }
    Ok((total, out))
}

/// Write each kind's batches, of all the parts in order, to ``kind-<branch>.arrow``; returns the
/// JSON summary.
fn write_kinds(parts: &[ByKind], args: &Args) -> Result<String, String> {
    let mut total = 0usize;
    let mut by_kind: BTreeMap<i8, (SchemaRef, Vec<&RecordBatch>)> = BTreeMap::new();
    for (rows, kinds) in parts {
        total += rows;
        for (t, (schema, batches)) in kinds {
            let entry = by_kind.entry(*t).or_insert_with(|| (schema.clone(), Vec::new()));
            if &entry.0 != schema {
                return Err(format!("the parts disagree on the schema of branch {t}"));
            }
            entry.1.extend(batches.iter());
        }
    }
    // Two writers, each taking the biggest kind left: writing to /dev/shm is mostly the kernel
    // finding pages, which two cores do twice as fast. Each kind is announced as soon as its file
    // is complete, so that it can be loaded while the others are written.
    let mut queue: Vec<(i8, SchemaRef, Vec<&RecordBatch>)> =
        by_kind.into_iter().map(|(t, (schema, batches))| (t, schema, batches)).collect();
    queue.sort_by_key(|(_, _, batches)| std::cmp::Reverse(batches.iter().map(|b| b.get_array_memory_size()).sum::<usize>()));
    let queue = std::sync::Mutex::new(queue.into_iter());
    let written = std::sync::Mutex::new(BTreeMap::new());
    let write_one = || -> Result<(), String> {
        loop {
            let next = queue.lock().map_err(|_| "a writer panicked".to_string())?.next();
            let Some((t, schema, batches)) = next else { return Ok(()) };
            let path = args.out_dir.join(format!("kind-{t}.arrow"));
            let file = File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            let mut writer =
                FileWriter::try_new(BufWriter::with_capacity(1 << 20, file), &schema).map_err(|e| e.to_string())?;
            let mut rows = 0;
            for b in batches {
                rows += b.num_rows();
                writer.write(b).map_err(|e| e.to_string())?;
            }
            writer.finish().map_err(|e| e.to_string())?;
            drop(writer);
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{{\"kind\":{t},\"rows\":{rows}}}").and_then(|_| stdout.flush())
                .map_err(|e| format!("cannot write to stdout: {e}"))?;
            written.lock().map_err(|_| "a writer panicked".to_string())?.insert(t, rows);
        }
    };
    std::thread::scope(|scope| {
        let other = scope.spawn(write_one);
        let mine = write_one();
        other.join().map_err(|_| "a writer panicked".to_string())?.and(mine)
    })?;
    let kinds: Vec<String> = written.into_inner().map_err(|_| "a writer panicked".to_string())?
        .into_iter().map(|(t, rows)| format!("\"{t}\":{rows}")).collect();
    Ok(format!("{{\"rows\":{total},\"kinds\":{{{}}}}}", kinds.join(",")))
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--ingest") {
        let done = ingest::parse_args(std::env::args().skip(2)).and_then(ingest::run);
        return match done {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("agentledger-avro2arrow --ingest: {e}");
                ExitCode::from(2)
            }
        };
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("agentledger-avro2arrow: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentledger-avro2arrow: {e}");
            ExitCode::from(2)
        }
    }
}
