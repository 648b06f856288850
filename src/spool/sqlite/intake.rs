//! The intake journal (`<path>.intake-<n>`, segments numbered in order): where an event
//! accepted while delivery runs is made durable, instead of a row in the database.
//!
//! Most events are delivered soon after their acceptance. Written to SQLite, each cost an
//! insert of its row (whole WAL pages, then again at the checkpoint), a claim, and a delete once
//! delivered, and the gate's CPU went to SQLite and the kernel more than to the event. Here an
//! accept appends one checksummed record to the current segment, and the batch's `fdatasync`
//! makes it durable before anyone is answered (the same group commit as before). A delivered
//! event appends a small *forget* record and never becomes a row; only its key does. The
//! journal is also the queue: an event that waits for delivery room waits here, in memory and
//! in its segment, and is handed to delivery when a delivery of its route ends.
//!
//! The keys of the journal's events go to SQLite within 100 ms, as one sorted run (`keys`),
//! and the checkpointer thread makes them durable (a sync of the WAL, off the accepts' path);
//! an event that becomes a row leaves its key with the journal's until then. Every
//! [`ABSORB_EVERY`](super::writer) the writer *absorbs*: it turns into rows, in one
//! `synchronous=FULL` transaction, what the journal should not keep — events that pin segments
//! too old (a slow delivery) — and deletes the segments, oldest first, that hold no live event
//! any more and whose keys are durable. An event whose attempt fails becomes a row at once
//! (retries, dead letters and replays only ever deal with rows).
//!
//! Waiting events are kept in memory up to a budget ([`HELD_BUDGET`]); one that arrives past it
//! is *spilled*: only its id, route, time and where its record is stay in memory, and its
//! record is read back from its segment when its delivery starts. (Such events used to become
//! rows at the next absorb, 2,000 at a time: under a load that outran delivery, the writer
//! spent most of its time writing them into SQLite — 5,800 WAL page writes a second — and the
//! accepts' p99 went from 7–9 to 22 ms.)
//!
//! # Record format
//!
//! Little-endian, one after another:
//!
//! ```text
//! u32 payload length | u32 CRC-32 of the payload | payload
//! payload = 1 | id i64 | claimed u8 | received_ms i64 | stored_ms i64 | key [32]
//!               | route str | query opt str | client identity opt str | headers bytes | body bytes
//!         | 2 | id i64                          -- forget: delivered, or now a row
//!         | 3 | id i64                          -- claim: an event that waited for room
//! str, bytes = u32 length | bytes;  opt str = u8 0 | u8 1, str
//! ```
//!
//! # Recovery
//!
//! Opening the spool reads every segment, each up to its first record that is incomplete or
//! fails its checksum (only a write no `fdatasync` covered can be torn, and no accept in it was
//! answered). An event is gone if any segment holds a forget record for it: forget records are
//! always in the event's segment or a later one, and segments are deleted oldest first, so a
//! forget record never disappears before the event it forgets. In the transaction that opens
//! the spool every event left becomes a row — one that was claimed as `in_flight` (made pending
//! with the rest, its attempt counted), one that waited for room as `pending` — and every key
//! is remembered. Rows already there are left as they are (an event made a row just before a
//! crash). Then the segments are deleted.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::sql::{beside, folder_of, Prepared};
use crate::spool::store::{decode_headers, from_unix_ms, IdMap, RouteMap};
use crate::spool::StoredEvent;

const EVENT: u8 = 1;
const FORGET: u8 = 2;
const CLAIM: u8 = 3;
/// A record announcing more than this is damage, not an event (bodies are capped far lower).
const MAX_PAYLOAD: usize = 1 << 30;

/// A segment is closed and the next one started once it holds this much.
const SEGMENT_BYTES: u64 = 8 << 20;

/// The memory waiting events' bodies and headers may take; past it, new waiting events are
/// spilled (see the module docs).
pub(crate) const HELD_BUDGET: u64 = 64 << 20;

/// Segment `n` of the journal beside the database file `db`.
pub(crate) fn segment_path(db: &Path, n: u64) -> PathBuf {
    beside(db, &format!(".intake-{n}"))
}

/// The journal's files beside `db`: what follows `<db>.intake-` in each name, and its path.
fn journal_files(db: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let Some(name) = db.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.intake-");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(folder_of(db))? {
        let entry = entry?;
        if let Some(rest) = entry
            .file_name()
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
        {
            found.push((rest.to_owned(), entry.path()));
        }
    }
    Ok(found)
}

/// The journal's segments beside `db`, by number.
fn segments_of(db: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found: Vec<(u64, PathBuf)> = journal_files(db)?
        .into_iter()
        .filter(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|(n, path)| Some((n.parse().ok()?, path)))
        .collect();
    found.sort();
    Ok(found)
}

fn sync_folder(db: &Path) -> std::io::Result<()> {
    File::open(folder_of(db))?.sync_all()
}

/// An event the journal holds and the database does not.
pub(crate) struct Held {
    /// Its fields as the database would store them; `headers` (decoded) only while it waits
    /// for delivery room (one claimed at birth handed them to its delivery).
    pub event: Prepared,
    /// When it was accepted (the batch's time, as a row's `stored_ms`).
    pub stored_ms: i64,
    /// The segment its record is in, and where in it.
    pub segment: u64,
    at: u64,
    /// Whether only the event's route and times are in memory (see [`Intake::fill`]).
    spilled: bool,
}

impl Held {
    /// The event as its first delivery attempt sees it, taking the decoded headers if it still
    /// has them (else decoding the stored form: a claim undone by a failed batch took them).
    pub(crate) fn take_stored(&mut self, id: i64) -> StoredEvent {
        let e = &mut self.event;
        let headers = if e.headers.is_empty() {
            decode_headers(&e.encoded_headers)
        } else {
            std::mem::take(&mut e.headers)
        };
        StoredEvent {
            id,
            route: e.route.clone(),
            body: e.body.clone(),
            headers,
            query: e.query.clone(),
            client_identity: e.client_identity.clone(),
            received_at: from_unix_ms(e.received_ms),
            attempt: 1,
        }
    }
}

impl Drop for Intake {
    /// Waits for the segment being prepared and the deletions asked for: a spool opened again
    /// in this process must not find a thread still writing zeros into the file it prepares
    /// anew, or deleting files.
    fn drop(&mut self) {
        if let Some((_, thread)) = self.next.take() {
            let _ = thread.join();
        }
        self.deleter.stop();
    }
}

/// Deletes segments on a thread of its own, in the order asked, syncing the folder after each
/// group: an 8 MiB file's `unlink` and the folder's sync took 3–7 ms, every ~300 ms under
/// load, on the writer thread — while every accept waited (the absorbs were the spool's p99).
struct Deleter {
    jobs: Option<std::sync::mpsc::Sender<Deletion>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Deletion {
    Segments(Vec<u64>),
    /// Answered once every deletion asked before is done.
    #[cfg(test)]
    Done(std::sync::mpsc::SyncSender<()>),
}

impl Deleter {
    fn start(db: &Path) -> std::io::Result<Deleter> {
        let (jobs, queue) = std::sync::mpsc::channel();
        let db = db.to_owned();
        let thread = std::thread::Builder::new()
            .name("hubgate-spool-del".to_owned())
            .spawn(move || {
                for job in queue {
                    match job {
                        Deletion::Segments(segments) => delete_segments(&db, &segments),
                        #[cfg(test)]
                        Deletion::Done(answer) => {
                            let _ = answer.send(());
                        }
                    }
                }
            })?;
        Ok(Deleter {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Deletes `segments` on the thread (here, if it is gone).
    fn delete(&self, db: &Path, segments: Vec<u64>) {
        let job = Deletion::Segments(segments);
        let unsent = match &self.jobs {
            Some(jobs) => jobs.send(job).err().map(|e| e.0),
            None => Some(job),
        };
        if let Some(Deletion::Segments(segments)) = unsent {
            delete_segments(db, &segments);
        }
    }

    /// Returns once every deletion asked for so far is done.
    #[cfg(test)]
    fn wait(&self) {
        let (answer, done) = std::sync::mpsc::sync_channel(1);
        if let Some(jobs) = &self.jobs {
            if jobs.send(Deletion::Done(answer)).is_ok() {
                let _ = done.recv();
            }
        }
    }

    fn stop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Deletes segments, in order, then syncs the folder: deleted segments stay deleted before
/// later ones go (see Recovery). A segment that cannot be deleted is left (the next start
/// deletes every old segment).
fn delete_segments(db: &Path, segments: &[u64]) {
    for &n in segments {
        if let Err(e) = std::fs::remove_file(segment_path(db, n)) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(error = %e, segment = n, "spool: cannot delete an intake segment");
            }
        }
    }
    if let Err(e) = sync_folder(db) {
        tracing::warn!(error = %e, "spool: cannot sync the spool's folder");
    }
}

/// What a failed batch takes back. (`Forgot` is large, but the list is reused batch after
/// batch: boxing it would cost an allocation per delivered event instead.)
#[allow(clippy::large_enum_variant)]
enum Undo {
    Held(i64),
    Key([u8; 32]),
    Forgot(i64, Held),
    Waited(String),
    Dequeued(String, i64),
}

/// The open journal and what of it is not in the database yet. The writer thread's alone.
pub(crate) struct Intake {
    db: PathBuf,
    /// The segment appended to, and its number.
    file: File,
    current: u64,
    /// Live events per segment (every segment not deleted yet, the current one included).
    live: BTreeMap<u64, usize>,
    /// Bytes in the current segment.
    len: u64,
    /// Bytes in the closed segments still kept.
    closed_bytes: u64,
    /// A segment is closed past this size ([`SEGMENT_BYTES`]; smaller in tests).
    segment_bytes: u64,
    /// The bytes of the current segment's file that were zero-filled and synced before use.
    capacity: u64,
    /// The next segment, being zero-filled on a thread of its own (see [`prepare`]).
    next: Option<(u64, std::thread::JoinHandle<std::io::Result<File>>)>,
    sizes: BTreeMap<u64, u64>,
    /// Whether bytes were written since the last `fdatasync`.
    unsynced: bool,
    /// This batch's records, written with it.
    buf: Vec<u8>,
    /// Events in the journal that are not rows: in flight, or waiting for room.
    pub held: IdMap<i64, Held>,
    /// The bodies and headers of `held`.
    held_bytes: u64,
    /// Past this, new waiting events are spilled ([`HELD_BUDGET`]; smaller in tests).
    pub held_budget: u64,
    /// The segment spilled events were last read back from.
    reader: Option<(u64, File)>,
    deleter: Deleter,
    /// Keys of the journal's events: when accepted, and the event's id.
    pub keys: IdMap<[u8; 32], (i64, i64)>,
    /// Held events waiting for delivery room, per route, in acceptance order.
    waiting: RouteMap<String, VecDeque<i64>>,
    undo: Vec<Undo>,
}

/// What [`Intake::recover`] found in the journal.
pub(crate) struct Recovered {
    /// Events not forgotten: (id, stored_ms, event, claimed).
    pub events: Vec<(i64, i64, Prepared, bool)>,
    /// Every event's key: (key, stored_ms, id).
    pub keys: Vec<([u8; 32], i64, i64)>,
    /// The highest id the journal holds.
    pub max_id: i64,
    /// Bytes past the last whole record (a write torn by a crash).
    pub torn_bytes: u64,
}

impl Intake {
    /// Reads what a previous process left in the journal of the spool at `db` (nothing if
    /// there are no segments).
    pub(crate) fn recover(db: &Path) -> std::io::Result<Recovered> {
        let mut events: HashMap<i64, (i64, Prepared, bool)> = HashMap::new();
        let mut forgotten = std::collections::HashSet::new();
        let mut claims = std::collections::HashSet::new();
        let mut keys = Vec::new();
        let mut max_id = 0;
        let mut torn_bytes = 0;
        for (_, path) in segments_of(db)? {
            let mut bytes = Vec::new();
            match File::open(&path) {
                Ok(mut f) => {
                    f.read_to_end(&mut bytes)?;
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let mut at = 0usize;
            while let Some((record, next)) = next_record(&bytes, at) {
                at = next;
                match record {
                    Record::Event {
                        id,
                        claimed,
                        stored_ms,
                        event,
                    } => {
                        max_id = max_id.max(id);
                        keys.push((event.key, stored_ms, id));
                        let e = events.entry(id).or_insert((stored_ms, *event, false));
                        e.2 |= claimed;
                    }
                    Record::Forget(id) => {
                        forgotten.insert(id);
                    }
                    Record::Claim(id) => {
                        claims.insert(id);
                    }
                }
            }
            // A segment is zero-filled ahead of use: zeros after the last record are room, not
            // a torn write.
            let rest = &bytes[at..];
            let zeros = rest.iter().rev().take_while(|&&b| b == 0).count();
            torn_bytes += (rest.len() - zeros) as u64;
        }
        let mut events: Vec<(i64, i64, Prepared, bool)> = events
            .into_iter()
            .filter(|(id, _)| !forgotten.contains(id))
            .map(|(id, (stored_ms, event, claimed))| {
                (id, stored_ms, event, claimed || claims.contains(&id))
            })
            .collect();
        events.sort_by_key(|e| e.0);
        Ok(Recovered {
            events,
            keys,
            max_id,
            torn_bytes,
        })
    }

    /// Deletes the journal's segments (what they held is recovered by then) and starts a new
    /// one, with owner-only permissions.
    pub(crate) fn open(db: &Path) -> std::io::Result<Intake> {
        let old = segments_of(db)?;
        let first = old.last().map_or(0, |(n, _)| n + 1);
        remove_unused_prepared(db)?;
        let file = prepare(db, first, SEGMENT_BYTES)?;
        std::fs::rename(prepared_path(db, first), segment_path(db, first))?;
        for (_, path) in &old {
            std::fs::remove_file(path)?;
        }
        sync_folder(db)?;
        let mut intake = Intake {
            db: db.to_owned(),
            file,
            current: first,
            live: BTreeMap::from([(first, 0)]),
            len: 0,
            closed_bytes: 0,
            segment_bytes: SEGMENT_BYTES,
            capacity: SEGMENT_BYTES,
            next: None,
            sizes: BTreeMap::new(),
            unsynced: false,
            buf: Vec::new(),
            held: IdMap::default(),
            held_bytes: 0,
            held_budget: HELD_BUDGET,
            reader: None,
            deleter: Deleter::start(db)?,
            keys: IdMap::default(),
            waiting: RouteMap::default(),
            undo: Vec::new(),
        };
        intake.prepare_next();
        Ok(intake)
    }

    /// Starts zero-filling the segment after the current one.
    fn prepare_next(&mut self) {
        let (db, n, size) = (self.db.clone(), self.current + 1, self.segment_bytes);
        let thread = std::thread::Builder::new()
            .name("hubgate-spool-seg".to_owned())
            .spawn(move || prepare(&db, n, size));
        match thread {
            Ok(t) => self.next = Some((n, t)),
            Err(e) => tracing::warn!(error = %e, "spool: cannot start preparing an intake segment"),
        }
    }

    /// Bytes in the segments kept, and in this batch so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.closed_bytes + self.len + self.buf.len() as u64
    }

    /// Whether an absorb has anything to do: keys to write, or segments to delete.
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.live.len() <= 1
    }

    /// The number of the oldest segment kept, and of the current one.
    pub(crate) fn segments(&self) -> (u64, u64) {
        let oldest = self.live.keys().next().copied().unwrap_or(self.current);
        (oldest, self.current)
    }

    /// Whether events of `route` wait for room.
    pub(crate) fn has_waiting(&self, route: &str) -> bool {
        self.waiting.get(route).is_some_and(|q| !q.is_empty())
    }

    /// Queues held event `id` behind `route`'s waiting events.
    pub(crate) fn wait(&mut self, route: &str, id: i64) {
        match self.waiting.get_mut(route) {
            Some(q) => q.push_back(id),
            None => {
                self.waiting.insert(route.to_owned(), VecDeque::from([id]));
            }
        }
        self.undo.push(Undo::Waited(route.to_owned()));
    }

    /// The next waiting event of `route` that is still held, taken off the queue.
    /// A spilled event is read back first; one that cannot be is taken off the queue all the
    /// same (an error: it stays in the journal, for the next start to recover what it can),
    /// so that the events behind it go on.
    pub(crate) fn next_waiting(&mut self, route: &str) -> std::io::Result<Option<i64>> {
        loop {
            let Some(&id) = self.waiting.get(route).and_then(|q| q.front()) else {
                return Ok(None);
            };
            let held = self.held.contains_key(&id);
            let filled = if held { self.fill(id) } else { Ok(()) };
            if let Some(q) = self.waiting.get_mut(route) {
                q.pop_front();
            }
            filled?;
            if held {
                self.undo.push(Undo::Dequeued(route.to_owned(), id));
                return Ok(Some(id));
            }
        }
    }

    /// Brings a spilled event's fields back into memory from its record (no-op for one that is
    /// not spilled): before it is delivered or becomes a row.
    pub(crate) fn fill(&mut self, id: i64) -> std::io::Result<()> {
        let Some(&Held {
            segment,
            at,
            spilled: true,
            ..
        }) = self.held.get(&id)
        else {
            return Ok(());
        };
        let event = self.read_event(segment, at, id)?;
        self.held_bytes += size_of(&event);
        if let Some(held) = self.held.get_mut(&id) {
            held.event = event;
            held.spilled = false;
        }
        Ok(())
    }

    /// Event `id`'s record at `at` in `segment`: in this batch's buffer if not written yet,
    /// else read from the segment's file.
    fn read_event(&mut self, segment: u64, at: u64, id: i64) -> std::io::Result<Prepared> {
        let record = if segment == self.current && at >= self.len {
            let from = usize::try_from(at - self.len).unwrap_or(usize::MAX);
            next_record(&self.buf, from)
        } else {
            if !matches!(&self.reader, Some((n, _)) if *n == segment) {
                self.reader = Some((segment, File::open(segment_path(&self.db, segment))?));
            }
            let Some((_, file)) = &self.reader else {
                unreachable!("opened above");
            };
            let mut head = [0u8; 8];
            file.read_exact_at(&mut head, at)?;
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if len > MAX_PAYLOAD {
                None
            } else {
                let mut bytes = vec![0u8; 8 + len];
                file.read_exact_at(&mut bytes, at)?;
                next_record(&bytes, 0)
            }
        };
        match record {
            Some((
                Record::Event {
                    id: found, event, ..
                },
                _,
            )) if found == id => Ok(*event),
            _ => Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("intake segment {segment} holds no record of event {id} at byte {at}"),
            )),
        }
    }

    /// Drops waiting entries of events no longer held (after an absorb made rows of them).
    pub(crate) fn prune_waiting(&mut self) {
        let held = &self.held;
        self.waiting.retain(|_, q| {
            q.retain(|id| held.contains_key(id));
            !q.is_empty()
        });
    }

    /// Starts a batch.
    pub(crate) fn begin(&mut self) {
        self.buf.clear();
        self.undo.clear();
    }

    /// Appends an accepted event, claimed at birth or waiting for room (its key too, when
    /// de-duplication is on).
    pub(crate) fn hold(
        &mut self,
        id: i64,
        claimed: bool,
        stored_ms: i64,
        event: Prepared,
        remember_key: bool,
    ) {
        // Where the batch's records will be written (see `write`).
        let at = self.len + self.buf.len() as u64;
        put_event(&mut self.buf, id, claimed, stored_ms, &event);
        if remember_key && self.keys.insert(event.key, (stored_ms, id)).is_none() {
            self.undo.push(Undo::Key(event.key));
        }
        let segment = self.current;
        *self.live.entry(segment).or_default() += 1;
        let spilled = !claimed && self.held_bytes + size_of(&event) > self.held_budget;
        let event = if spilled {
            Prepared {
                body: Bytes::new(),
                headers: http::HeaderMap::new(),
                encoded_headers: Vec::new(),
                query: None,
                client_identity: None,
                ..event
            }
        } else {
            event
        };
        self.held_bytes += size_of(&event);
        self.held.insert(
            id,
            Held {
                event,
                stored_ms,
                segment,
                at,
                spilled,
            },
        );
        self.undo.push(Undo::Held(id));
    }

    /// Records that an event that waited for room is being delivered now (so that a crash
    /// counts its attempt).
    pub(crate) fn claimed(&mut self, id: i64) {
        frame(&mut self.buf, |out| {
            out.push(CLAIM);
            out.extend_from_slice(&id.to_le_bytes());
        });
    }

    /// Takes an event out of the journal (delivered, or about to become a row) and returns it.
    pub(crate) fn forget(&mut self, id: i64) -> Option<&Held> {
        let held = self.held.remove(&id)?;
        if let Some(n) = self.live.get_mut(&held.segment) {
            *n = n.saturating_sub(1);
        }
        self.held_bytes -= size_of(&held.event);
        frame(&mut self.buf, |out| {
            out.push(FORGET);
            out.extend_from_slice(&id.to_le_bytes());
        });
        self.undo.push(Undo::Forgot(id, held));
        match self.undo.last() {
            Some(Undo::Forgot(_, held)) => Some(held),
            _ => None,
        }
    }

    /// Writes the batch's records; with `sync`, makes everything written so far durable.
    /// Returns whether an `fdatasync` was made. On an error nothing of the batch is left in
    /// the file (as far as the file can be cut back).
    pub(crate) fn write(&mut self, sync: bool) -> std::io::Result<bool> {
        let before = self.len;
        let result = (|| {
            if !self.buf.is_empty() {
                self.file.write_all_at(&self.buf, self.len)?;
                self.len += self.buf.len() as u64;
                self.unsynced = true;
            }
            if sync && self.unsynced {
                self.file.sync_data()?;
                self.unsynced = false;
                return Ok(true);
            }
            Ok(false)
        })();
        self.buf.clear();
        if result.is_err() {
            // Part of the batch may have reached the file: whatever did is taken back out.
            self.truncate(before);
        }
        result
    }

    /// The length before this batch, for [`Intake::cut`].
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Cuts the file back to `len` (a batch whose database commit failed after its records were
    /// written): what it held must not come back at the next start. (The zero-filled room past
    /// it becomes a hole, which reads as zeros too.)
    pub(crate) fn cut(&mut self, len: u64) {
        if self.len != len {
            self.truncate(len);
        }
    }

    /// Makes the current segment end at `len`, synced: nothing past it comes back.
    fn truncate(&mut self, len: u64) {
        let file = &self.file;
        let room = self.capacity.max(len);
        match file
            .set_len(len)
            .and_then(|()| file.set_len(room))
            .and_then(|()| file.sync_data())
        {
            Ok(()) => self.len = len,
            Err(e) => tracing::warn!(
                error = %e,
                "spool: cannot cut back the intake journal; a failed batch's events may be \
                 delivered after the next start"
            ),
        }
    }

    /// Takes back what this batch did to the memory state (after a failed batch).
    pub(crate) fn rollback(&mut self) {
        self.buf.clear();
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Held(id) => {
                    if let Some(h) = self.held.remove(&id) {
                        if let Some(n) = self.live.get_mut(&h.segment) {
                            *n = n.saturating_sub(1);
                        }
                        self.held_bytes -= size_of(&h.event);
                    }
                }
                Undo::Key(key) => {
                    self.keys.remove(&key);
                }
                Undo::Forgot(id, held) => {
                    *self.live.entry(held.segment).or_default() += 1;
                    self.held_bytes += size_of(&held.event);
                    self.held.insert(id, held);
                }
                Undo::Waited(route) => {
                    if let Some(q) = self.waiting.get_mut(&route) {
                        q.pop_back();
                    }
                }
                Undo::Dequeued(route, id) => {
                    self.waiting.entry(route).or_default().push_front(id);
                }
            }
        }
    }

    /// After a batch: once the current segment is full (and synced), the next one starts.
    pub(crate) fn maybe_roll(&mut self) {
        if self.len < self.segment_bytes || self.unsynced {
            return;
        }
        let next = self.current + 1;
        // The prepared segment (its thread has had the whole current segment's time); if its
        // preparation failed, a segment that grows as it is written.
        let prepared = match self.next.take() {
            Some((n, thread)) if n == next => thread
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the preparing thread panicked")))
                .map(|f| (f, self.segment_bytes)),
            _ => Err(std::io::Error::other("not prepared")),
        };
        let file = match prepared {
            Ok(ready) => std::fs::rename(prepared_path(&self.db, next), segment_path(&self.db, next))
                .map(|()| ready),
            Err(e) => Err(e),
        }
        .or_else(|e| {
            tracing::debug!(error = %e, segment = next, "spool: intake segment not prepared; it grows as written");
            create_segment(&self.db, next).map(|f| (f, 0))
        });
        match file.and_then(|f| sync_folder(&self.db).map(|()| f)) {
            Ok((file, capacity)) => {
                self.sizes.insert(self.current, self.len);
                self.closed_bytes += self.len;
                self.file = file;
                self.capacity = capacity;
                self.current = next;
                self.len = 0;
                self.live.insert(next, 0);
                self.prepare_next();
            }
            // The current segment grows on; the next batch tries again.
            Err(e) => tracing::warn!(error = %e, "spool: cannot start a new intake segment"),
        }
    }

    /// Deletes closed segments numbered below `below`, oldest first, while they hold no live
    /// event (on the deleter thread: they are gone from this state at once). Returns how many.
    pub(crate) fn collect(&mut self, below: u64) -> usize {
        let mut gone = Vec::new();
        while let Some((&n, &live)) = self.live.first_key_value() {
            if n == self.current || n >= below || live > 0 {
                break;
            }
            self.live.remove(&n);
            self.closed_bytes -= self.sizes.remove(&n).unwrap_or(0);
            if matches!(&self.reader, Some((r, _)) if *r == n) {
                self.reader = None;
            }
            gone.push(n);
        }
        let deleted = gone.len();
        if deleted > 0 {
            self.deleter.delete(&self.db, gone);
        }
        deleted
    }

    /// Returns once the segments [`collect`](Intake::collect) gave up are deleted.
    #[cfg(test)]
    pub(crate) fn deleted(&self) {
        self.deleter.wait();
    }
}

/// Creates segment `n`, owner-only, empty.
fn create_segment(db: &Path, n: u64) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(segment_path(db, n))
}

/// Where segment `n` is prepared before it is renamed into place.
fn prepared_path(db: &Path, n: u64) -> PathBuf {
    beside(db, &format!(".intake-{n}.next"))
}

/// Prepares segment `n` under [`prepared_path`]: `size` bytes of zeros, synced. Records then
/// overwrite zeros of a file whose size and blocks do not change, so a batch's `fdatasync`
/// writes the data alone; on a growing file it also writes the inode, a second synchronous
/// write (measured here: half the CPU and latency of each `fdatasync`). Recovery reads zeros
/// after the last record as room, and a length of zero ends a segment's records.
fn prepare(db: &Path, n: u64, size: u64) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(prepared_path(db, n))?;
    // A page at a time: the page cache keeps what one write brings in as one folio, and a
    // later record dirties (and a sync writes back) the whole folio it lands in — 1 MiB each
    // when filled in 1 MiB writes (65 KiB written per 1.2 KiB record, measured), a page each
    // this way (1.4 KiB, as for a file that grows).
    let zeros = [0u8; 4096];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], at)?;
        at += n;
    }
    file.sync_data()?;
    Ok(file)
}

/// Deletes segments a previous process prepared and never used.
fn remove_unused_prepared(db: &Path) -> std::io::Result<()> {
    for (rest, path) in journal_files(db)? {
        if rest.ends_with(".next") {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

/// Adds the events the journal of the spool at `db` holds to `summary` (what another process
/// than the gate sees of them: every event without a forget record, read from the segments).
pub(crate) fn add_to_summary(
    db: &Path,
    summary: &mut crate::spool::store::Summary,
) -> std::io::Result<()> {
    use crate::spool::store::EventState;
    for (_, _, event, claimed) in Intake::recover(db)?.events {
        let state = if claimed {
            EventState::InFlight
        } else {
            EventState::Pending
        };
        summary.add(&event.route, state, 1, event.received_ms);
    }
    Ok(())
}

/// What a held event's body and headers take.
pub(crate) fn size_of(event: &Prepared) -> u64 {
    (event.body.len() + event.encoded_headers.len()) as u64
}

/// Appends an event record.
fn put_event(out: &mut Vec<u8>, id: i64, claimed: bool, stored_ms: i64, event: &Prepared) {
    frame(out, |out| {
        out.push(EVENT);
        out.extend_from_slice(&id.to_le_bytes());
        out.push(u8::from(claimed));
        out.extend_from_slice(&event.received_ms.to_le_bytes());
        out.extend_from_slice(&stored_ms.to_le_bytes());
        out.extend_from_slice(&event.key);
        put_bytes(out, event.route.as_bytes());
        put_opt(out, event.query.as_deref());
        put_opt(out, event.client_identity.as_deref());
        put_bytes(out, &event.encoded_headers);
        put_bytes(out, &event.body);
    });
}

/// Appends one record: length, checksum, then what `payload` writes.
fn frame(out: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    payload(out);
    let body = &out[start + 8..];
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_bytes(out, s.as_bytes());
        }
    }
}

enum Record {
    Event {
        id: i64,
        claimed: bool,
        stored_ms: i64,
        event: Box<Prepared>,
    },
    Forget(i64),
    Claim(i64),
}

/// The record at `at` and where the next one starts; `None` at the end or at the first record
/// that is incomplete, fails its checksum or does not parse.
fn next_record(bytes: &[u8], at: usize) -> Option<(Record, usize)> {
    let head = bytes.get(at..at.checked_add(8)?)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
    if len == 0 || len > MAX_PAYLOAD {
        return None;
    }
    let end = at.checked_add(8)?.checked_add(len)?;
    let payload = bytes.get(at + 8..end)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let mut r = Reader(payload);
    let record = match r.u8()? {
        EVENT => {
            let id = r.i64()?;
            let claimed = match r.u8()? {
                0 => false,
                1 => true,
                _ => return None,
            };
            let received_ms = r.i64()?;
            let stored_ms = r.i64()?;
            let key: [u8; 32] = r.take(32)?.try_into().ok()?;
            let route = r.string()?;
            let query = r.opt_string()?;
            let client_identity = r.opt_string()?;
            let encoded_headers = r.bytes()?.to_vec();
            let body = Bytes::copy_from_slice(r.bytes()?);
            Record::Event {
                id,
                claimed,
                stored_ms,
                event: Box::new(Prepared {
                    route,
                    body,
                    headers: http::HeaderMap::new(),
                    encoded_headers,
                    query,
                    client_identity,
                    received_ms,
                    key,
                }),
            }
        }
        FORGET => Record::Forget(r.i64()?),
        CLAIM => Record::Claim(r.i64()?),
        _ => return None,
    };
    if !r.0.is_empty() {
        return None;
    }
    Some((record, end))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(len)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }

    fn opt_string(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.string()?)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u8) -> Prepared {
        Prepared {
            route: "/a".to_owned(),
            body: Bytes::from(vec![n; 100 + usize::from(n)]),
            headers: http::HeaderMap::new(),
            encoded_headers: b"x-hub-signature-256: sha256=00\n".to_vec(),
            query: (n % 2 == 0).then(|| format!("q={n}")),
            client_identity: Some("client.webhooks.fbclientcerts.com".to_owned()),
            received_ms: 1_000 + i64::from(n),
            key: [n; 32],
        }
    }

    #[test]
    fn records_round_trip_and_forgotten_events_stay_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("spool.db");
        let mut intake = Intake::open(&db).unwrap();
        intake.begin();
        for n in 1..=4 {
            intake.hold(i64::from(n), n == 1, 5_000, event(n), true);
        }
        intake.claimed(3);
        assert!(intake.forget(2).is_some());
        assert!(intake.write(true).unwrap());
        drop(intake);
        let r = Intake::recover(&db).unwrap();
        assert_eq!(r.max_id, 4);
        assert_eq!(r.torn_bytes, 0);
        assert_eq!(
            r.keys.len(),
            4,
            "a forgotten event's key is still recovered"
        );
        let ids: Vec<(i64, bool)> = r.events.iter().map(|(id, _, _, c)| (*id, *c)).collect();
        assert_eq!(ids, [(1, true), (3, true), (4, false)]);
        let (_, stored, e, _) = &r.events[1];
        let want = event(3);
        assert_eq!(*stored, 5_000);
        assert_eq!(
            (&e.route, &e.body, &e.query),
            (&want.route, &want.body, &want.query)
        );
        assert_eq!(e.encoded_headers, want.encoded_headers);
        assert_eq!(
            (e.client_identity.clone(), e.received_ms, e.key),
            (want.client_identity, want.received_ms, want.key)
        );
    }

    #[test]
    fn waiting_events_past_the_budget_are_spilled_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("spool.db");
        let mut intake = Intake::open(&db).unwrap();
        // Room for two events' bodies and headers (events 1 and 2: 131 + 132 bytes each).
        intake.held_budget = 300;
        let same = |e: &Prepared, n: u8| {
            let want = event(n);
            assert_eq!(e.body, want.body, "event {n}");
            assert_eq!(e.encoded_headers, want.encoded_headers, "event {n}");
            assert_eq!(
                (&e.query, &e.client_identity, e.received_ms, e.key),
                (
                    &want.query,
                    &want.client_identity,
                    want.received_ms,
                    want.key
                ),
                "event {n}"
            );
        };
        intake.begin();
        for n in 1..=4 {
            intake.hold(i64::from(n), false, 5_000, event(n), true);
            intake.wait("/a", i64::from(n));
        }
        assert_eq!(
            intake.held.values().filter(|h| h.spilled).count(),
            2,
            "events 3 and 4 are past the budget"
        );
        assert!(intake.held_bytes <= 300, "{}", intake.held_bytes);
        assert!(intake.held[&4].event.body.is_empty());
        // Read back from the batch not written yet.
        intake.fill(4).unwrap();
        same(&intake.held[&4].event, 4);
        intake.write(true).unwrap();
        // Read back from the written segment, then (event 5) from a closed one.
        intake.begin();
        intake.hold(5, false, 5_000, event(5), true);
        intake.wait("/a", 5);
        intake.write(true).unwrap();
        assert!(intake.held[&5].spilled);
        intake.segment_bytes = 1;
        intake.maybe_roll();
        assert_eq!(intake.segments(), (0, 1));
        let mut order = Vec::new();
        while let Some(id) = intake.next_waiting("/a").unwrap() {
            let held = intake.held.get_mut(&id).unwrap();
            assert!(!held.spilled);
            let stored = held.take_stored(id);
            same(&held.event, id as u8);
            assert_eq!(stored.body, event(id as u8).body);
            order.push(id);
        }
        assert_eq!(order, [1, 2, 3, 4, 5], "acceptance order");
        // A record that is not there: an error; the event leaves the line (the one behind it
        // goes on) but not the journal.
        intake.begin();
        for n in 6..=7 {
            intake.hold(i64::from(n), false, 5_000, event(n), true);
            intake.wait("/a", i64::from(n));
        }
        intake.write(true).unwrap();
        intake.held.get_mut(&6).unwrap().at += 1;
        assert!(intake.next_waiting("/a").is_err());
        assert_eq!(intake.next_waiting("/a").unwrap(), Some(7));
        assert!(intake.held.contains_key(&6));
        assert!(intake.fill(6).is_err());
    }

    #[test]
    fn recovery_stops_at_a_torn_or_damaged_record() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("spool.db");
        let path = segment_path(&db, 0);
        let mut intake = Intake::open(&db).unwrap();
        intake.begin();
        intake.hold(1, true, 5_000, event(1), true);
        intake.hold(2, true, 5_000, event(2), true);
        intake.write(true).unwrap();
        drop(intake);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file.len() as u64, SEGMENT_BYTES, "zero-filled ahead");
        assert_eq!(
            Intake::recover(&db).unwrap().torn_bytes,
            0,
            "zeros are room"
        );
        let whole =
            file[..file.len() - file.iter().rev().take_while(|&&b| b == 0).count()].to_vec();
        // Every cut inside the second record recovers the first one only.
        let first_len = 8 + u32::from_le_bytes(whole[..4].try_into().unwrap()) as usize;
        for cut in [first_len + 1, first_len + 8, whole.len() - 1] {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let r = Intake::recover(&db).unwrap();
            assert_eq!(r.events.len(), 1, "cut at {cut}");
            assert_eq!(r.torn_bytes, (cut - first_len) as u64);
        }
        // A flipped bit in the second record's body: its checksum fails.
        let mut damaged = whole.clone();
        let last = damaged.len() - 3;
        damaged[last] ^= 0x10;
        std::fs::write(&path, &damaged).unwrap();
        assert_eq!(Intake::recover(&db).unwrap().events.len(), 1);
        // No files: nothing to recover.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(Intake::recover(&db).unwrap().events.len(), 0);
    }

    #[test]
    fn segments_are_zero_filled_ahead_and_a_failed_batch_leaves_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("spool.db");
        let mut intake = Intake::open(&db).unwrap();
        intake.begin();
        intake.hold(1, true, 5_000, event(1), true);
        intake.write(true).unwrap();
        let kept = intake.len();
        // A batch whose commit failed: its record is cut back out.
        intake.begin();
        intake.hold(2, true, 5_000, event(2), true);
        intake.write(true).unwrap();
        intake.cut(kept);
        let r = Intake::recover(&db).unwrap();
        assert_eq!((r.events.len(), r.torn_bytes), (1, 0));
        assert_eq!(
            std::fs::metadata(segment_path(&db, 0)).unwrap().len(),
            SEGMENT_BYTES
        );
        // Filled past its size: the prepared segment takes over, and the next is prepared.
        intake.begin();
        intake.hold(3, true, 5_000, event(3), true);
        intake.write(true).unwrap();
        intake.segment_bytes = 1;
        intake.maybe_roll();
        assert_eq!(intake.segments(), (0, 1));
        assert_eq!(
            std::fs::metadata(segment_path(&db, 1)).unwrap().len(),
            SEGMENT_BYTES
        );
        assert!(!prepared_path(&db, 1).exists());
        intake.begin();
        intake.hold(4, true, 5_000, event(4), true);
        intake.write(true).unwrap();
        let r = Intake::recover(&db).unwrap();
        let ids: Vec<i64> = r.events.iter().map(|e| e.0).collect();
        assert_eq!((ids, r.torn_bytes), (vec![1, 3, 4], 0));
        // What a process prepared and never used is deleted by the next one.
        drop(intake);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let _next = Intake::open(&db).unwrap();
        assert!(!prepared_path(&db, 2).exists());
    }

    #[test]
    fn segments_go_oldest_first_once_nothing_in_them_lives() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("spool.db");
        let mut intake = Intake::open(&db).unwrap();
        intake.segment_bytes = 1;
        let batch = |intake: &mut Intake, f: &dyn Fn(&mut Intake)| {
            intake.begin();
            f(intake);
            intake.write(true).unwrap();
            intake.maybe_roll();
        };
        batch(&mut intake, &|i| {
            i.hold(1, true, 5_000, event(1), true);
            i.hold(2, true, 5_000, event(2), true);
        });
        batch(&mut intake, &|i| i.hold(3, true, 5_000, event(3), true));
        assert_eq!(intake.segments(), (0, 2));
        // 3 (segment 1) delivered first: segment 1 cannot go before segment 0.
        batch(&mut intake, &|i| assert!(i.forget(3).is_some()));
        assert_eq!(intake.collect(u64::MAX), 0);
        batch(&mut intake, &|i| assert!(i.forget(1).is_some()));
        assert_eq!(intake.collect(u64::MAX), 0, "2 still lives in segment 0");
        batch(&mut intake, &|i| assert!(i.forget(2).is_some()));
        let before: Vec<Vec<u8>> = (0..5)
            .map(|n| std::fs::read(segment_path(&db, n)).unwrap())
            .collect();
        // Every batch filled its segment: segments 0-4 go, 5 is the current one.
        assert_eq!(intake.collect(u64::MAX), 5);
        intake.deleted();
        assert_eq!(intake.segments(), (5, 5));
        assert_eq!(segments_of(&db).unwrap().len(), 1);
        assert_eq!(Intake::recover(&db).unwrap().events.len(), 0);
        // A crash undoes the last deletions, whatever their number: a segment comes back only
        // with every later one (the folder is synced after deleting), so the forget records
        // come back with the events they forget.
        for n in 0..5 {
            std::fs::write(segment_path(&db, n), &before[n as usize]).unwrap();
        }
        let r = Intake::recover(&db).unwrap();
        assert_eq!(
            r.events.len(),
            0,
            "{:?}",
            r.events.iter().map(|e| e.0).collect::<Vec<_>>()
        );
        assert_eq!(r.keys.len(), 3);
        // The next open starts after the last segment and deletes the old ones.
        let reopened = Intake::open(&db).unwrap();
        assert!(reopened.current > intake.current);
        assert_eq!(segments_of(&db).unwrap().len(), 1);
    }

    #[test]
    fn a_rolled_back_batch_leaves_the_memory_state_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let mut intake = Intake::open(&dir.path().join("spool.db")).unwrap();
        intake.begin();
        intake.hold(1, true, 5_000, event(1), true);
        intake.write(true).unwrap();
        intake.begin();
        intake.hold(2, false, 5_000, event(2), true);
        assert!(intake.forget(1).is_some());
        intake.rollback();
        assert_eq!(intake.held.keys().copied().collect::<Vec<_>>(), [1]);
        assert_eq!(intake.keys.len(), 1);
        assert_eq!(intake.bytes(), intake.len());
    }
}
