//! Meta batches, item by item: one POST may carry many updates (`entry[]`, and in each entry
//! `changes[]` or `messaging[]`), and a retry may batch the same updates differently. This
//! module cuts a verified body into parts — one per entry, or one per item — and names each
//! item for de-duplication, without ever re-serialising what Meta sent.
//!
//! Exact to the byte: the JSON is parsed with serde_json's `RawValue`, which borrows each value
//! as the slice of the input it came from (escaped unicode, key order, spacing and number
//! spelling untouched). Only the small envelope around a part is written here, in Meta's shape
//! and with no spaces: `{"object":…,"entry":[{"id":…,"time":…,"changes":[<item>]}]}`, the
//! values of `object` and of the entry's other fields being slices of the original too.
//!
//! What is split, and what is not:
//! - a body that is not Meta's shape (not JSON, no `entry` array, an empty one) is not split
//!   at all: [`split`] says why, and the caller forwards the body whole;
//! - in item mode, an entry is cut into its `changes[]`/`messaging[]` elements, each delivered
//!   with a copy of the entry's other fields (`id`, `time`, Graph's `uid`, …) in their order;
//!   an entry holding another array (Messenger's `standby`, `changed_fields`), a key twice, or
//!   no item at all stays whole, as one part: nothing is dropped and nothing repeated.
//!
//! Item keys ([`Part::key`]) follow what Meta documents as an update's identity: WhatsApp
//! message ids (wamid) and status id + status, Messenger message ids (`mid`), postbacks'
//! `mid`, read and delivery watermarks; any other item is known by the SHA-256 of its bytes.
//! Every key also covers the batch's `object` and the entry's `id`, so equal items of two
//! pages never collide. The entry's `time` is left out: it is when Meta batched the update,
//! and a retry may carry another.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// How a route cuts a batch (`split` in a route's configuration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitMode {
    /// The body is delivered whole (the default).
    #[default]
    None,
    /// One part per `entry[]` element, whole.
    Entry,
    /// One part per `changes[]` / `messaging[]` element.
    Item,
}

impl SplitMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Entry => "entry",
            Self::Item => "item",
        }
    }
}

/// Why a body was not split (it is then delivered whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsplit {
    /// Not valid JSON, or not an object.
    NotJson,
    /// No `entry` array (or no `object` beside it).
    NoEntries,
    /// An `entry` array with nothing in it.
    Empty,
}

impl Unsplit {
    /// The reason, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotJson => "not_json",
            Self::NoEntries => "no_entry_array",
            Self::Empty => "empty_batch",
        }
    }
}

/// What an item's key is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// WhatsApp `value.messages[].id`.
    Wamid,
    /// WhatsApp `value.statuses[]`: id and status.
    Status,
    /// Messenger/Instagram `message.mid`.
    Mid,
    /// Messenger `postback.mid`.
    Postback,
    /// Messenger `read.watermark` (with sender and recipient).
    Read,
    /// Messenger `delivery.watermark` (with sender and recipient).
    Delivery,
    /// The SHA-256 of the part's own bytes (an item of another kind, or a whole entry).
    Bytes,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wamid => "wamid",
            Self::Status => "status",
            Self::Mid => "mid",
            Self::Postback => "postback",
            Self::Read => "read",
            Self::Delivery => "delivery",
            Self::Bytes => "bytes",
        }
    }
}

/// One request's worth of a batch.
#[derive(Clone, Debug)]
pub struct Part {
    /// The part as delivered: Meta's envelope around slices of the original.
    pub body: Vec<u8>,
    /// The item (or entry) as it appeared in the original body, byte for byte.
    pub item: std::ops::Range<usize>,
    /// The update's identity for de-duplication (see the module's documentation).
    pub key: [u8; 32],
    pub key_kind: KeyKind,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    object: &'a RawValue,
    #[serde(borrow)]
    entry: Vec<&'a RawValue>,
}

/// An entry's fields in their order, values as raw slices.
struct Fields<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Self::Value, M::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, &'de RawValue>()? {
                    fields.push((k, v));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// The arrays whose elements are items.
const ITEM_ARRAYS: [&str; 2] = ["changes", "messaging"];

/// Cuts a body into parts. `Err` says why it is not a Meta batch; the caller then delivers it
/// whole. [`SplitMode::None`] gives one part, the body itself.
pub fn split(body: &[u8], mode: SplitMode) -> Result<Vec<Part>, Unsplit> {
    let envelope: Envelope = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) if e.is_data() => return Err(Unsplit::NoEntries),
        Err(_) => return Err(Unsplit::NotJson),
    };
    if envelope.entry.is_empty() {
        return Err(Unsplit::Empty);
    }
    let object = envelope.object.get().as_bytes();
    let mut parts = Vec::with_capacity(envelope.entry.len());
    for entry in &envelope.entry {
        match mode {
            SplitMode::None => return Ok(vec![whole(body, object)]),
            SplitMode::Entry => parts.push(entry_part(body, object, entry)),
            SplitMode::Item => split_entry(body, object, entry, &mut parts),
        }
    }
    Ok(parts)
}

/// Where `inner` (a slice of `outer`) starts in it.
fn range_in(outer: &[u8], inner: &str) -> std::ops::Range<usize> {
    let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
    start..start + inner.len()
}

/// The body as one part.
fn whole(body: &[u8], object: &[u8]) -> Part {
    Part {
        body: body.to_vec(),
        item: 0..body.len(),
        key: key(object, None, KeyKind::Bytes, &[body]),
        key_kind: KeyKind::Bytes,
    }
}

/// An entry delivered whole, in its own batch of one.
fn entry_part(body: &[u8], object: &[u8], entry: &RawValue) -> Part {
    let raw = entry.get().as_bytes();
    let fields = serde_json::from_str::<Fields>(entry.get()).ok();
    let id = fields
        .as_ref()
        .and_then(|f| f.0.iter().find(|(k, _)| k == "id"))
        .map(|(_, v)| v.get().as_bytes());
    let mut out = Vec::with_capacity(raw.len() + object.len() + 24);
    out.extend_from_slice(b"{\"object\":");
    out.extend_from_slice(object);
    out.extend_from_slice(b",\"entry\":[");
    out.extend_from_slice(raw);
    out.extend_from_slice(b"]}");
    Part {
        body: out,
        item: range_in(body, entry.get()),
        key: key(object, id, KeyKind::Bytes, &[raw]),
        key_kind: KeyKind::Bytes,
    }
}

/// Cuts one entry into its items, each in a copy of the entry's other fields; or, when the
/// entry cannot be cut without losing or repeating something, keeps it whole.
fn split_entry(body: &[u8], object: &[u8], entry: &RawValue, parts: &mut Vec<Part>) {
    match cut(entry) {
        Some((fields, arrays)) if arrays.iter().any(|(_, items)| !items.is_empty()) => {
            let id = fields
                .0
                .iter()
                .find(|(k, _)| k == "id")
                .map(|(_, v)| v.get().as_bytes());
            for (name, items) in &arrays {
                for item in items {
                    let (key_kind, key) = item_key(object, id, name, item);
                    parts.push(Part {
                        body: envelope(object, &fields, name, item.get().as_bytes()),
                        item: range_in(body, item.get()),
                        key,
                        key_kind,
                    });
                }
            }
        }
        _ => parts.push(entry_part(body, object, entry)),
    }
}

/// An entry's fields and its item arrays, if it can be cut: an object, each key once, and no
/// array besides `changes` and `messaging` (another array, such as Messenger's `standby`,
/// would have to be dropped or repeated in every part).
type Cut<'a> = (Fields<'a>, Vec<(&'static str, Vec<&'a RawValue>)>);

fn cut(entry: &RawValue) -> Option<Cut<'_>> {
    let fields: Fields = serde_json::from_str(entry.get()).ok()?;
    let mut arrays = Vec::new();
    for (i, (k, v)) in fields.0.iter().enumerate() {
        if fields.0[..i].iter().any(|(seen, _)| seen == k) {
            return None;
        }
        if let Some(name) = ITEM_ARRAYS.iter().find(|a| **a == k) {
            arrays.push((*name, serde_json::from_str::<Vec<&RawValue>>(v.get()).ok()?));
        } else if v.get().starts_with('[') {
            return None;
        }
    }
    Some((fields, arrays))
}

/// `{"object":O,"entry":[{…the entry's other fields…,"<array>":[<item>]}]}`, fields in the
/// entry's order; the other item array, if the entry had both, left out.
fn envelope(object: &[u8], fields: &Fields, array: &str, item: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(item.len() + object.len() + 64);
    out.extend_from_slice(b"{\"object\":");
    out.extend_from_slice(object);
    out.extend_from_slice(b",\"entry\":[{");
    let mut first = true;
    for (k, v) in &fields.0 {
        let value = if k == array {
            None
        } else if ITEM_ARRAYS.contains(&k.as_str()) {
            continue;
        } else {
            Some(v.get().as_bytes())
        };
        if !first {
            out.push(b',');
        }
        first = false;
        // Keys are written by us: as JSON strings (Meta's are plain ASCII, so the same bytes).
        out.extend_from_slice(serde_json::to_string(k).unwrap_or_default().as_bytes());
        out.push(b':');
        match value {
            Some(v) => out.extend_from_slice(v),
            None => {
                out.push(b'[');
                out.extend_from_slice(item);
                out.push(b']');
            }
        }
    }
    out.extend_from_slice(b"}]}");
    out
}

/// A key: SHA-256 over a version tag, the batch's `object`, the entry's `id` and the kind,
/// then the identity's pieces, each length-prefixed (no two inputs share an encoding).
fn key(object: &[u8], id: Option<&[u8]>, kind: KeyKind, pieces: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"hubgate item key v1\0");
    let mut put = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    put(object);
    put(id.unwrap_or(b""));
    put(kind.as_str().as_bytes());
    for p in pieces {
        put(p);
    }
    h.finalize().into()
}

#[derive(Deserialize)]
struct Change<'a> {
    #[serde(borrow, default)]
    value: Option<ChangeValue<'a>>,
}

#[derive(Deserialize)]
struct ChangeValue<'a> {
    #[serde(borrow, default)]
    messages: Vec<WithId<'a>>,
    #[serde(borrow, default)]
    statuses: Vec<Status<'a>>,
}

#[derive(Deserialize)]
struct WithId<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Status<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    status: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Messaging<'a> {
    #[serde(borrow, default)]
    sender: Option<WithId<'a>>,
    #[serde(borrow, default)]
    recipient: Option<WithId<'a>>,
    #[serde(borrow, default)]
    message: Option<WithMid<'a>>,
    #[serde(borrow, default)]
    postback: Option<WithMid<'a>>,
    #[serde(borrow, default)]
    read: Option<Watermark<'a>>,
    #[serde(borrow, default)]
    delivery: Option<Watermark<'a>>,
}

#[derive(Deserialize)]
struct WithMid<'a> {
    #[serde(borrow, default)]
    mid: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Watermark<'a> {
    #[serde(borrow)]
    watermark: &'a RawValue,
}

/// An item's identity, falling back to its bytes whenever the documented fields are not there
/// (or not of the documented types).
fn item_key(object: &[u8], id: Option<&[u8]>, array: &str, item: &RawValue) -> (KeyKind, [u8; 32]) {
    let raw = item.get().as_bytes();
    let bytes = || (KeyKind::Bytes, key(object, id, KeyKind::Bytes, &[raw]));
    match array {
        "changes" => {
            let Ok(Change { value: Some(v) }) = serde_json::from_str::<Change>(item.get()) else {
                return bytes();
            };
            let mut pieces: Vec<&[u8]> = Vec::new();
            for m in &v.messages {
                pieces.push(m.id.as_bytes());
            }
            let kind = if pieces.is_empty() {
                KeyKind::Status
            } else {
                KeyKind::Wamid
            };
            for s in &v.statuses {
                pieces.push(s.id.as_bytes());
                pieces.push(s.status.as_bytes());
            }
            if pieces.is_empty() {
                return bytes();
            }
            (kind, key(object, id, kind, &pieces))
        }
        "messaging" => {
            let Ok(m) = serde_json::from_str::<Messaging>(item.get()) else {
                return bytes();
            };
            let party = |p: &Option<WithId<'_>>| p.as_ref().map(|p| p.id.to_string());
            let (sender, recipient) = (party(&m.sender), party(&m.recipient));
            let with_parties = |kind: KeyKind, mark: &RawValue| {
                let (s, r) = (sender.as_deref(), recipient.as_deref());
                let pieces: [&[u8]; 3] = [
                    s.unwrap_or("").as_bytes(),
                    r.unwrap_or("").as_bytes(),
                    mark.get().as_bytes(),
                ];
                (kind, key(object, id, kind, &pieces))
            };
            if let Some(mid) = m.message.as_ref().and_then(|x| x.mid.as_deref()) {
                (
                    KeyKind::Mid,
                    key(object, id, KeyKind::Mid, &[mid.as_bytes()]),
                )
            } else if let Some(mid) = m.postback.as_ref().and_then(|x| x.mid.as_deref()) {
                let k = KeyKind::Postback;
                (k, key(object, id, k, &[mid.as_bytes()]))
            } else if let Some(r) = &m.read {
                with_parties(KeyKind::Read, r.watermark)
            } else if let Some(d) = &m.delivery {
                with_parties(KeyKind::Delivery, d.watermark)
            } else {
                bytes()
            }
        }
        _ => bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shapes as Meta's documentation shows them (field names, nesting, escaped unicode), with
    // made-up ids.
    const WA_MESSAGES: &str = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},"contacts":[{"profile":{"name":"Sheena Nelson"},"wa_id":"16505551234"}],"messages":[{"from":"16505551234","id":"wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=","timestamp":"1749416383","text":{"body":"\u00e4\u00f6\u00e5 in another colour? \ud83d\ude00 \/ <b>"},"type":"text"}]},"field":"messages"},{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},"statuses":[{"id":"wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBI3MTE5MjMwQjEzQUJGQjY5RjcA","status":"delivered","timestamp":"1750263773","recipient_id":"16505551234"}]},"field":"messages"}]}]}"#;

    const MESSENGER: &str = r#"{"object":"page","entry":[{"id":"1234","time":1458692752478,"messaging":[{"sender":{"id":"5678"},"recipient":{"id":"1234"},"timestamp":1458692752478,"message":{"mid":"m_abc","text":"caf\u00e9 \u003cscript\u003e"}},{"sender":{"id":"5678"},"recipient":{"id":"1234"},"timestamp":1458692752479,"read":{"watermark":1458668856253}}]},{"id":"1234","time":1458692752480,"messaging":[{"sender":{"id":"5679"},"recipient":{"id":"1234"},"timestamp":1458692752480,"postback":{"mid":"m_pb","title":"Start","payload":"GET_STARTED"}},{"sender":{"id":"5679"},"recipient":{"id":"1234"},"delivery":{"mids":["m_x"],"watermark":1458668856253}}]}]}"#;

    /// The Graph example of the getting-started page, spacing and key order kept.
    const GRAPH_USER: &str = "{\n  \"entry\": [\n    {\n      \"time\": 1520383571,\n      \"changes\": [\n        {\n          \"field\": \"photos\",\n          \"value\":\n            {\n              \"verb\": \"update\",\n              \"object_id\": \"10211885744794461\"\n            }\n        }\n      ],\n      \"id\": \"10210299214172187\",\n      \"uid\": \"10210299214172187\"\n    }\n  ],\n  \"object\": \"user\"\n}";

    fn text(p: &Part) -> &str {
        std::str::from_utf8(&p.body).unwrap()
    }

    /// Every part's item is the original's bytes at its range, and appears in the part whole.
    fn assert_slices(body: &str, parts: &[Part]) {
        for p in parts {
            let item = &body.as_bytes()[p.item.clone()];
            assert!(
                p.body.windows(item.len()).any(|w| w == item),
                "part {} does not hold its item {}",
                text(p),
                std::str::from_utf8(item).unwrap()
            );
            // Every part is JSON in Meta's shape.
            let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
            assert!(v["entry"].as_array().is_some_and(|e| e.len() == 1));
        }
    }

    #[test]
    fn whatsapp_items_are_changes_elements_with_their_value_byte_for_byte() {
        let parts = split(WA_MESSAGES.as_bytes(), SplitMode::Item).unwrap();
        assert_eq!(parts.len(), 2);
        assert_slices(WA_MESSAGES, &parts);
        let message = r#"{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},"contacts":[{"profile":{"name":"Sheena Nelson"},"wa_id":"16505551234"}],"messages":[{"from":"16505551234","id":"wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=","timestamp":"1749416383","text":{"body":"\u00e4\u00f6\u00e5 in another colour? \ud83d\ude00 \/ <b>"},"type":"text"}]},"field":"messages"}"#;
        assert_eq!(
            text(&parts[0]),
            format!(
                r#"{{"object":"whatsapp_business_account","entry":[{{"id":"102290129340398","changes":[{message}]}}]}}"#
            )
        );
        assert_eq!(&WA_MESSAGES[parts[0].item.clone()], message);
        assert_eq!(parts[0].key_kind, KeyKind::Wamid);
        assert_eq!(parts[1].key_kind, KeyKind::Status);
        assert_ne!(parts[0].key, parts[1].key);
    }

    #[test]
    fn messenger_items_keep_entry_id_and_time_and_are_known_by_mid_postback_and_watermarks() {
        let parts = split(MESSENGER.as_bytes(), SplitMode::Item).unwrap();
        assert_eq!(parts.len(), 4);
        assert_slices(MESSENGER, &parts);
        assert_eq!(
            text(&parts[0]),
            r#"{"object":"page","entry":[{"id":"1234","time":1458692752478,"messaging":[{"sender":{"id":"5678"},"recipient":{"id":"1234"},"timestamp":1458692752478,"message":{"mid":"m_abc","text":"caf\u00e9 \u003cscript\u003e"}}]}]}"#
        );
        // The second entry's time, not the first's.
        assert!(text(&parts[2]).starts_with(r#"{"object":"page","entry":[{"id":"1234","time":1458692752480,"messaging":[{"sender":{"id":"5679"}"#));
        let kinds: Vec<_> = parts.iter().map(|p| p.key_kind).collect();
        assert_eq!(
            kinds,
            [
                KeyKind::Mid,
                KeyKind::Read,
                KeyKind::Postback,
                KeyKind::Delivery
            ]
        );
        // Same watermark, other sender: another update.
        assert_ne!(parts[1].key, parts[3].key);
    }

    #[test]
    fn instagram_messaging_items_are_known_by_mid() {
        let body = r#"{"object":"instagram","entry":[{"time":1569262486134,"id":"17841400000000000","messaging":[{"sender":{"id":"9000"},"recipient":{"id":"17841400000000000"},"timestamp":1569262485349,"message":{"mid":"aWdfZAG1faXRlbTo1","text":"\u2764\ufe0f"}},{"sender":{"id":"9000"},"recipient":{"id":"17841400000000000"},"timestamp":1569262485350,"reaction":{"mid":"aWdfZAG1faXRlbTo1","action":"react","reaction":"love","emoji":"\u2764"}}]}]}"#;
        let parts = split(body.as_bytes(), SplitMode::Item).unwrap();
        assert_eq!(parts.len(), 2);
        assert_slices(body, &parts);
        assert!(text(&parts[0]).starts_with(
            r#"{"object":"instagram","entry":[{"time":1569262486134,"id":"17841400000000000","messaging":[{"sender""#
        ));
        assert_eq!(parts[0].key_kind, KeyKind::Mid);
        // A reaction names the message it reacts to: known by its bytes, not taken for it.
        assert_eq!(parts[1].key_kind, KeyKind::Bytes);
        assert_ne!(parts[0].key, parts[1].key);
    }

    #[test]
    fn graph_changes_keep_the_originals_spacing_and_the_entrys_other_fields() {
        let parts = split(GRAPH_USER.as_bytes(), SplitMode::Item).unwrap();
        assert_eq!(parts.len(), 1);
        assert_slices(GRAPH_USER, &parts);
        let item = "{\n          \"field\": \"photos\",\n          \"value\":\n            {\n              \"verb\": \"update\",\n              \"object_id\": \"10211885744794461\"\n            }\n        }";
        assert_eq!(
            text(&parts[0]),
            format!("{{\"object\":\"user\",\"entry\":[{{\"time\":1520383571,\"changes\":[{item}],\"id\":\"10210299214172187\",\"uid\":\"10210299214172187\"}}]}}")
        );
        assert_eq!(parts[0].key_kind, KeyKind::Bytes);
    }

    #[test]
    fn entry_mode_delivers_each_entry_whole() {
        let parts = split(MESSENGER.as_bytes(), SplitMode::Entry).unwrap();
        assert_eq!(parts.len(), 2);
        assert_slices(MESSENGER, &parts);
        let first = &MESSENGER[parts[0].item.clone()];
        assert!(first.starts_with(r#"{"id":"1234","time":1458692752478,"messaging":["#));
        assert_eq!(
            text(&parts[0]),
            format!(r#"{{"object":"page","entry":[{first}]}}"#)
        );
        // None: the body itself, one part.
        let whole = split(MESSENGER.as_bytes(), SplitMode::None).unwrap();
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].body, MESSENGER.as_bytes());
    }

    #[test]
    fn a_retry_batched_differently_gives_the_same_keys() {
        let first = split(MESSENGER.as_bytes(), SplitMode::Item).unwrap();
        // The postback again, alone, in a batch of another time with a new message beside it;
        // spaced differently too.
        let retry = r#"{"object":"page","entry":[ {"time":1458692799999, "id":"1234","messaging":[{"sender":{"id":"5679"},"recipient":{"id":"1234"},"timestamp":1458692752480,"postback":{"mid":"m_pb","title":"Start","payload":"GET_STARTED"}}, {"sender":{"id":"5680"},"recipient":{"id":"1234"},"message":{"mid":"m_new","text":"hi"}}]}]}"#;
        let again = split(retry.as_bytes(), SplitMode::Item).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again[0].key, first[2].key, "the postback is recognised");
        assert!(
            first.iter().all(|p| p.key != again[1].key),
            "the new message is new"
        );
        // The same ids under another page are other updates.
        let other_page = MESSENGER.replace(r#""id":"1234","time""#, r#""id":"9999","time""#);
        let other = split(other_page.as_bytes(), SplitMode::Item).unwrap();
        assert!(first.iter().zip(&other).all(|(a, b)| a.key != b.key));
    }

    #[test]
    fn entries_that_cannot_be_cut_stay_whole_and_nothing_is_dropped() {
        // Messenger's handover `standby` array, an entry with an empty item array, an entry
        // that is not an object, a key twice: each one part, the entry's own bytes.
        let body = r#"{"object":"page","entry":[{"id":"1","time":2,"standby":[{"sender":{"id":"3"}}]},{"id":"4","messaging":[]},42,{"id":"5","changes":[{"a":1}],"changes":[{"b":2}]},{"id":"6","changes":[{"field":"feed","value":"x"}, 7]}]}"#;
        let parts = split(body.as_bytes(), SplitMode::Item).unwrap();
        assert_eq!(parts.len(), 6);
        assert_slices(body, &parts);
        assert_eq!(
            &body[parts[0].item.clone()],
            r#"{"id":"1","time":2,"standby":[{"sender":{"id":"3"}}]}"#
        );
        assert_eq!(&body[parts[2].item.clone()], "42");
        assert_eq!(
            &body[parts[3].item.clone()],
            r#"{"id":"5","changes":[{"a":1}],"changes":[{"b":2}]}"#
        );
        // A malformed item (a number where an object belongs) is still an item of its own.
        assert_eq!(&body[parts[5].item.clone()], "7");
        assert_eq!(parts[5].key_kind, KeyKind::Bytes);
    }

    #[test]
    fn bodies_that_are_not_meta_batches_are_not_split() {
        assert_eq!(
            split(b"not json", SplitMode::Item).unwrap_err(),
            Unsplit::NotJson
        );
        assert_eq!(
            split(br#"{"object":"page","entry":[{"id":"1"}"#, SplitMode::Item).unwrap_err(),
            Unsplit::NotJson
        );
        assert_eq!(
            split(br#"{"object":"page"}"#, SplitMode::Entry).unwrap_err(),
            Unsplit::NoEntries
        );
        assert_eq!(
            split(br#"{"object":"page","entry":{}}"#, SplitMode::Entry).unwrap_err(),
            Unsplit::NoEntries
        );
        assert_eq!(
            split(b"[1,2]", SplitMode::Entry).unwrap_err(),
            Unsplit::NoEntries
        );
        assert_eq!(
            split(br#"{"object":"page","entry":[]}"#, SplitMode::Item).unwrap_err(),
            Unsplit::Empty
        );
        // Invalid UTF-8 inside a string.
        assert_eq!(
            split(b"{\"object\":\"p\xff\",\"entry\":[1]}", SplitMode::Item).unwrap_err(),
            Unsplit::NotJson
        );
    }

    #[test]
    fn a_thousand_items_split_in_one_pass() {
        let item = r#"{"sender":{"id":"1"},"recipient":{"id":"2"},"message":{"mid":"m_N","text":"hello"}}"#;
        let items: Vec<String> = (0..1000)
            .map(|i| item.replace("m_N", &format!("m_{i}")))
            .collect();
        let body = format!(
            r#"{{"object":"page","entry":[{{"id":"2","time":1,"messaging":[{}]}}]}}"#,
            items.join(",")
        );
        let parts = split(body.as_bytes(), SplitMode::Item).unwrap();
        assert_eq!(parts.len(), 1000);
        let keys: std::collections::HashSet<_> = parts.iter().map(|p| p.key).collect();
        assert_eq!(keys.len(), 1000);
        assert_eq!(&body[parts[999].item.clone()], items[999]);
    }
}
