//! The de-duplication keys: sorted runs in `key_runs`, found through filters in memory.
//!
//! A key is 32 bytes of SHA-256, so keys arrive in random order. Kept in a B-tree (the
//! `dedupe` table of schema version 3), every key dirtied a leaf page of its own: a 4 KiB page
//! written to the WAL and again by the checkpoint for 48 bytes of key, ~2.9 `pwrite64` per
//! accepted event, half the spool's throughput. Here keys are written the way a log-structured
//! merge tree writes them:
//!
//! - the writer gathers the keys of new events in memory (the intake journal keeps them
//!   durable meanwhile) and writes them, sorted, as one **run**: one row whose `records` blob
//!   holds them back to back, a sequential write of 48 bytes per key;
//! - every run has, in memory only, a **filter** (a blocked Bloom filter, 16 bits per key, all
//!   of one key's bits in one 64-byte block) and **fences** (the first key's leading 8 bytes of
//!   every block of [`BLOCK`] records): a lookup reads a run's blob only when its filter says
//!   the key may be there (~0.1 % of runs for a key that is not), then one block of it;
//! - runs are **merged** [`FANOUT`] at a time, oldest first per level, by a thread of their
//!   own ([`merger`]) that reads them on its own connection and hands the writer the merged
//!   records to swap in (one transaction: the old rows deleted, the new one inserted); a merge
//!   drops the keys past the window, and a run whose newest key is past it is deleted whole.
//!   A merge never makes a run of more than [`MAX_RUN_KEYS`] (the swap holds up the accepts
//!   while it writes, ~24 MiB at most); runs that would are merged no further, so a gate that
//!   accepts many millions of events per window has as many runs of that size, and a lookup
//!   checks one filter block per run.
//!
//! Memory: the filters and fences take ~2.1 bytes per key in the window (13 million keys —
//! 100 events a second for the default 36 hours — take ~27 MiB).
//!
//! ```text
//! records = (key [32] | accepted_ms i64 LE | event_id i64 LE)*, sorted by key, keys distinct
//! ```
//!
//! The filters and fences are rebuilt when the spool opens, from the runs (one sequential
//! read of every key). Everything stays readable with `sqlite3`: `SELECT level, keys,
//! datetime(newest_ms / 1000, 'unixepoch') FROM key_runs`.

use std::path::Path;
use std::sync::mpsc::{Receiver, Sender};

use rusqlite::{params, Connection, OptionalExtension, MAIN_DB};
use tracing::warn;

/// Bytes per key in a run.
pub(crate) const RECORD: usize = 48;
/// Records per fence.
const BLOCK: usize = 64;
/// Runs of one level merged into one of the next.
pub(crate) const FANOUT: usize = 8;
/// Runs of this level are never merged further (only deleted once past the window): with
/// runs written every 100 ms at the least, a run of this level spans hours.
const MAX_LEVEL: u8 = 6;
/// A merge makes runs of this many keys at most (24 MiB): the writer swaps a merge in within
/// one transaction, which holds up the accepts for as long as it writes. Runs that would merge
/// into a larger one stay as they are, and are merged no further.
const MAX_RUN_KEYS: usize = 1 << 19;
/// Filter bits per key (~0.1 % false positives).
const FILTER_BITS_PER_KEY: usize = 16;
/// Filter bits set per key, all in the block the key picks.
const FILTER_PROBES: usize = 6;

/// A key, when it was accepted (Unix ms), and its event's id.
pub(crate) type Entry = ([u8; 32], i64, i64);

/// Sorts `entries` by key and encodes them as a run's records; of keys that repeat, the last
/// accepted one stays; keys accepted before `cutoff` are dropped.
pub(crate) fn encode(entries: &mut Vec<Entry>, cutoff: i64) -> Vec<u8> {
    entries.retain(|e| e.1 >= cutoff);
    // Newest first among equal keys, so that `dedup` keeps it.
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    entries.dedup_by(|next, kept| next.0 == kept.0);
    let mut out = Vec::with_capacity(entries.len() * RECORD);
    for (key, at, id) in entries.iter() {
        out.extend_from_slice(key);
        out.extend_from_slice(&at.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// The records of a run, decoded.
fn decode(records: &[u8]) -> impl Iterator<Item = Entry> + '_ {
    records.chunks_exact(RECORD).map(|r| {
        let mut key = [0u8; 32];
        key.copy_from_slice(&r[..32]);
        let at = i64::from_le_bytes(r[32..40].try_into().unwrap_or_default());
        let id = i64::from_le_bytes(r[40..48].try_into().unwrap_or_default());
        (key, at, id)
    })
}

/// A key's leading 8 bytes, in the keys' order.
fn prefix(key: &[u8; 32]) -> u64 {
    u64::from_be_bytes(key[..8].try_into().unwrap_or_default())
}

/// A blocked Bloom filter over a run's keys. A key's bits come from the key itself (SHA-256
/// output needs no more hashing): bytes 0..8 pick the block, bytes 8..16 the bits in it.
struct Filter {
    blocks: Vec<[u64; 8]>,
}

impl Filter {
    fn with_keys(n: usize) -> Filter {
        let blocks = (n * FILTER_BITS_PER_KEY).div_ceil(512).max(1);
        Filter {
            blocks: vec![[0; 8]; blocks],
        }
    }

    /// The block and the bits (0..512) of `key`.
    fn spots(&self, key: &[u8; 32]) -> (usize, [u16; FILTER_PROBES]) {
        let pick = u64::from_le_bytes(key[..8].try_into().unwrap_or_default());
        let block = ((u128::from(pick) * self.blocks.len() as u128) >> 64) as usize;
        let mut bits = u64::from_le_bytes(key[8..16].try_into().unwrap_or_default());
        let mut spots = [0u16; FILTER_PROBES];
        for s in &mut spots {
            *s = (bits & 511) as u16;
            bits >>= 9;
        }
        (block, spots)
    }

    fn insert(&mut self, key: &[u8; 32]) {
        let (block, spots) = self.spots(key);
        let b = &mut self.blocks[block];
        for s in spots {
            b[usize::from(s / 64)] |= 1 << (s % 64);
        }
    }

    fn may_contain(&self, key: &[u8; 32]) -> bool {
        let (block, spots) = self.spots(key);
        let b = &self.blocks[block];
        spots
            .iter()
            .all(|&s| b[usize::from(s / 64)] & (1 << (s % 64)) != 0)
    }

    fn bytes(&self) -> usize {
        self.blocks.len() * 64
    }
}

/// What memory knows of a run's records.
pub(crate) struct Shape {
    keys: usize,
    oldest_ms: i64,
    newest_ms: i64,
    filter: Filter,
    fences: Vec<u64>,
}

impl Shape {
    /// Builds the filter and fences of sorted records.
    pub(crate) fn of(records: &[u8]) -> Shape {
        let keys = records.len() / RECORD;
        let mut filter = Filter::with_keys(keys);
        let mut fences = Vec::with_capacity(keys.div_ceil(BLOCK));
        let (mut oldest_ms, mut newest_ms) = (i64::MAX, i64::MIN);
        for (i, (key, at, _)) in decode(records).enumerate() {
            filter.insert(&key);
            if i % BLOCK == 0 {
                fences.push(prefix(&key));
            }
            oldest_ms = oldest_ms.min(at);
            newest_ms = newest_ms.max(at);
        }
        Shape {
            keys,
            oldest_ms,
            newest_ms,
            filter,
            fences,
        }
    }
}

/// One row of `key_runs`, as memory knows it.
struct Run {
    id: i64,
    level: u8,
    shape: Shape,
}

/// The merge the writer asks for: these runs, into one of `level`, without the keys accepted
/// before `cutoff`.
pub(crate) struct MergeRequest {
    pub ids: Vec<i64>,
    pub level: u8,
    pub cutoff: i64,
}

/// A merge's result, for the writer to swap in.
pub(crate) struct Merged {
    ids: Vec<i64>,
    level: u8,
    records: Vec<u8>,
    shape: Shape,
}

/// Every run of the spool, as the writer knows them (the writer's alone).
#[derive(Default)]
pub(crate) struct KeyRuns {
    /// By id: oldest first.
    runs: Vec<Run>,
    /// A merge was asked for and has not come back.
    merging: bool,
}

impl KeyRuns {
    /// Reads every run of the spool and builds its filter and fences.
    pub(crate) fn load(conn: &Connection) -> rusqlite::Result<KeyRuns> {
        let mut stmt = conn.prepare("SELECT id, level, records FROM key_runs ORDER BY id")?;
        let mut rows = stmt.query([])?;
        let mut runs = Vec::new();
        while let Some(r) = rows.next()? {
            let records = r.get_ref(2)?.as_blob()?;
            runs.push(Run {
                id: r.get(0)?,
                level: r.get::<_, i64>(1)?.clamp(0, i64::from(MAX_LEVEL)) as u8,
                shape: Shape::of(records),
            });
        }
        Ok(KeyRuns {
            runs,
            merging: false,
        })
    }

    /// Whether `key` was accepted at or after `since` according to the runs.
    pub(crate) fn contains_since(
        &self,
        conn: &Connection,
        key: &[u8; 32],
        since: i64,
    ) -> rusqlite::Result<bool> {
        for run in self.runs.iter().rev() {
            if run.shape.newest_ms < since || !run.shape.filter.may_contain(key) {
                continue;
            }
            if find(conn, run, key)?.is_some_and(|at| at >= since) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Keys in the runs (a key accepted again after its window may count twice until a merge).
    pub(crate) fn keys(&self) -> u64 {
        self.runs.iter().map(|r| r.shape.keys as u64).sum()
    }

    /// Memory the filters and fences take.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.runs
            .iter()
            .map(|r| r.shape.filter.bytes() + r.shape.fences.len() * 8)
            .sum()
    }

    pub(crate) fn len(&self) -> usize {
        self.runs.len()
    }

    /// Writes `entries` as a new run of level 0 in the caller's transaction; the returned run
    /// is added with [`KeyRuns::add`] once that commits. `None`: no entries.
    pub(crate) fn write(
        conn: &Connection,
        entries: &mut Vec<Entry>,
    ) -> rusqlite::Result<Option<NewRun>> {
        let records = encode(entries, i64::MIN);
        if records.is_empty() {
            return Ok(None);
        }
        let shape = Shape::of(&records);
        let id = insert(conn, 0, &records, &shape)?;
        Ok(Some(NewRun(Run {
            id,
            level: 0,
            shape,
        })))
    }

    pub(crate) fn add(&mut self, run: NewRun) {
        self.runs.push(run.0);
    }

    /// Deletes the runs whose every key was accepted before `cutoff`, in the caller's
    /// transaction; returns how many keys went. (Memory forgets them at once: if the
    /// transaction fails, the rows stay until the next prune, and they held no key that
    /// counts.)
    pub(crate) fn expire(&mut self, conn: &Connection, cutoff: i64) -> rusqlite::Result<u64> {
        conn.prepare_cached("DELETE FROM key_runs WHERE newest_ms < ?1")?
            .execute(params![cutoff])?;
        let mut gone = 0;
        self.runs.retain(|r| {
            let keep = r.shape.newest_ms >= cutoff;
            if !keep {
                gone += r.shape.keys as u64;
            }
            keep
        });
        Ok(gone)
    }

    /// The next merge to make, if one is due and none is under way: the oldest [`FANOUT`] runs
    /// of the lowest level that has that many (runs that would make one of more than
    /// [`MAX_RUN_KEYS`] are left as they are, and merged no further).
    pub(crate) fn plan(&mut self, cutoff: i64) -> Option<MergeRequest> {
        if self.merging {
            return None;
        }
        for level in 0..MAX_LEVEL {
            let (ids, keys) = self
                .runs
                .iter()
                .filter(|r| r.level == level)
                .take(FANOUT)
                .fold((Vec::new(), 0), |(mut ids, keys), r| {
                    ids.push(r.id);
                    (ids, keys + r.shape.keys)
                });
            if ids.len() == FANOUT && keys > MAX_RUN_KEYS {
                for r in self.runs.iter_mut().filter(|r| ids.contains(&r.id)) {
                    r.level = MAX_LEVEL;
                }
                continue;
            }
            if ids.len() == FANOUT {
                self.merging = true;
                return Some(MergeRequest {
                    ids,
                    level: level + 1,
                    cutoff,
                });
            }
        }
        None
    }

    /// Whether a merge is under way.
    pub(crate) fn merging(&self) -> bool {
        self.merging
    }

    /// The merge could not be made: another may be planned.
    pub(crate) fn merge_failed(&mut self) {
        self.merging = false;
    }

    /// Swaps a merge's inputs for its output, in a transaction of its own (`synchronous` as
    /// the connection has it: a merge lost to a power cut leaves its inputs, which hold every
    /// key it did).
    pub(crate) fn apply(&mut self, conn: &Connection, merged: Merged) -> rusqlite::Result<()> {
        self.merging = false;
        let id = super::writer::in_transaction(conn, || -> rusqlite::Result<_> {
            let mut delete = conn.prepare_cached("DELETE FROM key_runs WHERE id = ?1")?;
            for id in &merged.ids {
                delete.execute(params![id])?;
            }
            if merged.records.is_empty() {
                return Ok(None);
            }
            insert(conn, merged.level, &merged.records, &merged.shape).map(Some)
        })?;
        self.runs.retain(|r| !merged.ids.contains(&r.id));
        if let Some(id) = id {
            self.runs.push(Run {
                id,
                level: merged.level,
                shape: merged.shape,
            });
        }
        Ok(())
    }
}

/// A run written in a transaction that has not committed yet.
pub(crate) struct NewRun(Run);

fn insert(conn: &Connection, level: u8, records: &[u8], shape: &Shape) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO key_runs (level, keys, oldest_ms, newest_ms, records)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        level,
        shape.keys as i64,
        shape.oldest_ms,
        shape.newest_ms,
        records
    ])?;
    Ok(conn.last_insert_rowid())
}

/// When `key` was accepted according to `run` (its filter said it may be there): reads the
/// block(s) its fences point at.
fn find(conn: &Connection, run: &Run, key: &[u8; 32]) -> rusqlite::Result<Option<i64>> {
    let p = prefix(key);
    let fences = &run.shape.fences;
    // Keys sharing the leading 8 bytes may straddle blocks: read from the block before the
    // first fence at `p` to the last one at it.
    let lo = fences.partition_point(|&f| f < p).saturating_sub(1);
    let hi = fences.partition_point(|&f| f <= p).max(lo + 1);
    let start = lo * BLOCK;
    let end = (hi * BLOCK).min(run.shape.keys);
    if start >= end {
        return Ok(None);
    }
    let mut buf = vec![0u8; (end - start) * RECORD];
    let Some(blob) = conn
        .blob_open(MAIN_DB, c"key_runs", c"records", run.id, true)
        .optional()?
    else {
        return Ok(None);
    };
    blob.read_at_exact(&mut buf, start * RECORD)?;
    let records: Vec<&[u8]> = buf.chunks_exact(RECORD).collect();
    Ok(records
        .binary_search_by(|r| r[..32].cmp(&key[..]))
        .ok()
        .and_then(|i| decode(records[i]).next())
        .map(|(_, at, _)| at))
}

/// The merger thread: for each request, reads the runs on a connection of its own (rows are
/// never changed, only deleted, and only by the writer), merges them, builds the filter and
/// fences, and hands the result back. Ends when the writer drops its sender.
pub(crate) fn merger(
    path: &Path,
    requests: Receiver<MergeRequest>,
    done: Sender<Result<Merged, String>>,
) {
    let conn = match super::sql::open_reader(path) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "spool: the key merger cannot open the database; keys are not merged");
            // Answer every request so that the writer plans no more.
            while requests.recv().is_ok() {
                let _ = done.send(Err(e.to_string()));
            }
            return;
        }
    };
    while let Ok(req) = requests.recv() {
        let merged = merge(&conn, req).map_err(|e| e.to_string());
        if done.send(merged).is_err() {
            break;
        }
    }
}

/// Reads and merges the runs of `req` (runs deleted meanwhile are left out).
fn merge(conn: &Connection, req: MergeRequest) -> rusqlite::Result<Merged> {
    let mut entries = Vec::new();
    conn.execute_batch("BEGIN")?;
    let read = (|| -> rusqlite::Result<()> {
        let mut stmt = conn.prepare_cached("SELECT records FROM key_runs WHERE id = ?1")?;
        for id in &req.ids {
            let mut rows = stmt.query(params![id])?;
            if let Some(r) = rows.next()? {
                entries.extend(decode(r.get_ref(0)?.as_blob()?));
            }
        }
        Ok(())
    })();
    let _ = conn.execute_batch("COMMIT");
    read?;
    let records = encode(&mut entries, req.cutoff);
    let shape = Shape::of(&records);
    Ok(Merged {
        ids: req.ids,
        level: req.level,
        records,
        shape,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::store::dedupe_key;
    use crate::spool::SpoolSettings;

    fn key(n: u64) -> [u8; 32] {
        dedupe_key("/k", n.to_string().as_bytes())
    }

    /// A spool file (its schema) and its writer connection.
    fn spool() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let opened =
            super::super::sql::open_gate(&SpoolSettings::new(dir.path().join("spool.db"))).unwrap();
        (dir, opened.conn)
    }

    fn write(conn: &Connection, runs: &mut KeyRuns, entries: &[Entry]) {
        let mut entries = entries.to_vec();
        conn.execute_batch("BEGIN").unwrap();
        let run = KeyRuns::write(conn, &mut entries).unwrap();
        conn.execute_batch("COMMIT").unwrap();
        runs.add(run.unwrap());
    }

    fn stored_keys(conn: &Connection) -> i64 {
        conn.query_row("SELECT coalesce(sum(keys), 0) FROM key_runs", [], |r| {
            r.get(0)
        })
        .unwrap()
    }

    #[test]
    fn a_run_finds_every_key_it_holds_and_no_other() {
        let (_dir, conn) = spool();
        let mut runs = KeyRuns::default();
        let entries: Vec<Entry> = (0..10_000)
            .map(|n| (key(n), 1_000 + n as i64, n as i64))
            .collect();
        write(&conn, &mut runs, &entries);
        for &(k, at, _) in &entries {
            assert!(runs.contains_since(&conn, &k, at).unwrap());
            assert!(
                !runs.contains_since(&conn, &k, at + 1).unwrap(),
                "accepted before `since`"
            );
        }
        for n in 10_000..20_000 {
            assert!(!runs.contains_since(&conn, &key(n), 0).unwrap());
        }
        // Reopened: the filters and fences are rebuilt from the rows.
        let loaded = KeyRuns::load(&conn).unwrap();
        assert_eq!((loaded.len(), loaded.keys()), (1, 10_000));
        assert!(loaded.contains_since(&conn, &key(4_321), 0).unwrap());
        assert!(!loaded.contains_since(&conn, &key(10_001), 0).unwrap());
    }

    #[test]
    fn keys_sharing_their_leading_bytes_are_found_across_blocks() {
        let (_dir, conn) = spool();
        let mut runs = KeyRuns::default();
        // Three blocks of keys whose first 8 bytes are all equal: the fences cannot tell
        // them apart.
        let entries: Vec<Entry> = (0..3 * BLOCK as u64)
            .map(|n| {
                let mut k = key(n);
                k[..8].copy_from_slice(&[7; 8]);
                (k, 5, n as i64)
            })
            .collect();
        write(&conn, &mut runs, &entries);
        for &(k, _, _) in &entries {
            assert!(runs.contains_since(&conn, &k, 0).unwrap());
        }
        let mut absent = key(999_999);
        absent[..8].copy_from_slice(&[7; 8]);
        assert!(!runs.contains_since(&conn, &absent, 0).unwrap());
    }

    #[test]
    fn the_filter_rarely_sends_a_lookup_to_the_disk() {
        let records = encode(&mut (0..100_000).map(|n| (key(n), 1, 1)).collect(), 0);
        let shape = Shape::of(&records);
        let false_positives = (100_000..200_000)
            .filter(|&n| shape.filter.may_contain(&key(n)))
            .count();
        // 16 bits per key, 6 probes in one 512-bit block: ~0.1 %.
        assert!(false_positives < 500, "{false_positives} in 100000");
        assert!((0..100_000).all(|n| shape.filter.may_contain(&key(n))));
    }

    #[test]
    fn a_merge_keeps_the_newest_of_a_key_and_drops_the_expired() {
        let (_dir, conn) = spool();
        let mut runs = KeyRuns::default();
        // Eight runs of level 0: key 0 in two of them, key 1 expired by the merge's cutoff.
        for r in 0..FANOUT as u64 {
            let mut entries = vec![(key(100 + r), 500, r as i64)];
            match r {
                0 => entries.extend([(key(0), 200, 10), (key(1), 50, 11)]),
                5 => entries.push((key(0), 300, 12)),
                _ => {}
            }
            write(&conn, &mut runs, &entries);
        }
        assert_eq!(stored_keys(&conn), 11);
        let req = runs.plan(100).expect("eight runs of level 0");
        assert_eq!((req.ids.len(), req.level), (FANOUT, 1));
        assert!(runs.plan(100).is_none(), "one merge at a time");
        let merged = merge(
            &super::super::sql::open_reader(&_dir.path().join("spool.db")).unwrap(),
            req,
        )
        .unwrap();
        runs.apply(&conn, merged).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(stored_keys(&conn), 9, "one copy of key 0, key 1 gone");
        assert!(
            runs.contains_since(&conn, &key(0), 300).unwrap(),
            "the newest"
        );
        assert!(!runs.contains_since(&conn, &key(1), 0).unwrap());
        for r in 0..FANOUT as u64 {
            assert!(runs.contains_since(&conn, &key(100 + r), 500).unwrap());
        }
        let levels: Vec<i64> = conn
            .prepare("SELECT level FROM key_runs")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(levels, [1]);
        assert!(runs.plan(100).is_none(), "nothing more to merge");
    }

    #[test]
    fn runs_that_would_merge_into_too_large_a_run_stay_as_they_are() {
        let run = |id, level, keys| Run {
            id,
            level,
            shape: Shape {
                keys,
                oldest_ms: 0,
                newest_ms: 0,
                filter: Filter::with_keys(0),
                fences: Vec::new(),
            },
        };
        let big = MAX_RUN_KEYS / FANOUT + 1;
        let mut runs = KeyRuns {
            runs: (0..FANOUT as i64).map(|id| run(id, 0, big)).collect(),
            merging: false,
        };
        // Eight small runs of level 1 come after them: those are merged.
        runs.runs
            .extend((10..10 + FANOUT as i64).map(|id| run(id, 1, 10)));
        let req = runs.plan(0).expect("the small ones");
        assert_eq!(req.ids, (10..10 + FANOUT as i64).collect::<Vec<_>>());
        assert!(runs.runs[..FANOUT].iter().all(|r| r.level == MAX_LEVEL));
        runs.merge_failed();
        assert_eq!(runs.plan(0).map(|r| r.level), Some(2), "planned again");
    }

    #[test]
    fn a_merge_whose_runs_expired_meanwhile_deletes_nothing_newer() {
        let (dir, conn) = spool();
        let mut runs = KeyRuns::default();
        for r in 0..FANOUT as u64 {
            write(&conn, &mut runs, &[(key(r), 100, r as i64)]);
        }
        let req = runs.plan(0).unwrap();
        // The window passes while the merge is made: its runs are deleted before it reads
        // them, and a new run is written before it comes back (whose id must not be one the
        // merge names).
        assert_eq!(runs.expire(&conn, 1_000).unwrap(), FANOUT as u64);
        let reader = super::super::sql::open_reader(&dir.path().join("spool.db")).unwrap();
        let merged = merge(&reader, req).unwrap();
        write(&conn, &mut runs, &[(key(99), 2_000, 99)]);
        runs.apply(&conn, merged).unwrap();
        assert!(runs.contains_since(&conn, &key(99), 2_000).unwrap());
        assert_eq!((runs.len(), stored_keys(&conn)), (1, 1));
    }

    #[test]
    fn runs_past_the_window_are_deleted_whole() {
        let (_dir, conn) = spool();
        let mut runs = KeyRuns::default();
        write(&conn, &mut runs, &[(key(1), 100, 1), (key(2), 200, 2)]);
        write(&conn, &mut runs, &[(key(3), 150, 3), (key(4), 400, 4)]);
        assert_eq!(runs.expire(&conn, 300).unwrap(), 2);
        assert_eq!((runs.len(), stored_keys(&conn)), (1, 2));
        // The run that stays still holds key 3, expired: lookups judge every key by its time.
        assert!(!runs.contains_since(&conn, &key(3), 300).unwrap());
        assert!(runs.contains_since(&conn, &key(4), 300).unwrap());
    }

    #[test]
    fn version_3_keys_become_runs() {
        let dir = tempfile::tempdir().unwrap();
        let settings = SpoolSettings::new(dir.path().join("spool.db"));
        let opened = super::super::sql::open_gate(&settings).unwrap();
        opened
            .conn
            .execute_batch(
                "CREATE TABLE dedupe (key BLOB PRIMARY KEY, accepted_ms INTEGER NOT NULL,
                     event_id INTEGER NOT NULL) WITHOUT ROWID;
                 CREATE INDEX dedupe_age ON dedupe (accepted_ms);
                 PRAGMA user_version = 3;",
            )
            .unwrap();
        for n in 0..1_000u64 {
            opened
                .conn
                .execute(
                    "INSERT INTO dedupe (key, accepted_ms, event_id) VALUES (?1, ?2, ?3)",
                    params![&key(n)[..], 7_000 + n as i64, n as i64],
                )
                .unwrap();
        }
        drop(opened);
        let opened = super::super::sql::open_gate(&settings).unwrap();
        assert_eq!(opened.runs.keys(), 1_000);
        assert!(opened
            .runs
            .contains_since(&opened.conn, &key(999), 7_999)
            .unwrap());
        assert!(!opened
            .runs
            .contains_since(&opened.conn, &key(1_000), 0)
            .unwrap());
        let tables: i64 = opened
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name IN ('dedupe', 'dedupe_age')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0, "the B-tree is gone");
    }
}
