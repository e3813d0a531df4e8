//! Editing the document: following an entry's source pointer, writing its target, removing
//! what was mapped, all over the borrowing [`Node`] tree.

use serde_json::Value;
use std::borrow::Cow;

use super::error::TranslateError;
use super::pointer::Segment;
use super::tree::{Node, Object};
use super::{ApiVersion, Entry, Unmapped};

/// One place a source pointer leads to in a document; the array index bound to each `*` comes
/// with it.
enum Found<'a, 'v> {
    /// A value.
    Value(&'a mut Node<'v>),
    /// Nothing there; the indices are those bound before the path broke off.
    Absent,
    /// A `*` met an empty array.
    EmptyArray,
}

/// Calls `f` for each place `segs` leads to from `v`, in document order; stops at the first
/// error `f` returns.
fn find<'v, E>(
    v: Option<&mut Node<'v>>,
    segs: &[Segment],
    idx: &mut Vec<usize>,
    f: &mut impl FnMut(Found<'_, 'v>, &[usize]) -> Result<(), E>,
) -> Result<(), E> {
    let Some((seg, rest)) = segs.split_first() else {
        return f(v.map_or(Found::Absent, Found::Value), idx);
    };
    match (seg, v) {
        (Segment::Each, Some(Node::Array(items))) => {
            if items.is_empty() {
                return f(Found::EmptyArray, idx);
            }
            for (i, item) in items.iter_mut().enumerate() {
                idx.push(i);
                find(Some(item), rest, idx, f)?;
                idx.pop();
            }
            Ok(())
        }
        (Segment::Each, _) => f(Found::Absent, idx),
        (Segment::Key(k), v) => find(
            v.and_then(|v| match v {
                Node::Object(m) => m.get_mut(k),
                _ => None,
            }),
            rest,
            idx,
            f,
        ),
        (Segment::Index(n), v) => {
            let child = match v {
                Some(Node::Array(items)) => items.get_mut(*n),
                Some(Node::Object(m)) => m.get_mut(&n.to_string()),
                _ => None,
            };
            find(child, rest, idx, f)
        }
    }
}

fn object<'a, 'v>(v: &'a mut Node<'v>) -> &'a mut Object<'v> {
    if !matches!(v, Node::Object(_)) {
        *v = Node::Object(Object::default());
    }
    match v {
        Node::Object(m) => m,
        _ => unreachable!("just made an object"),
    }
}

fn element<'a, 'v>(v: &'a mut Node<'v>, i: usize) -> &'a mut Node<'v> {
    if !matches!(v, Node::Array(_)) {
        *v = Node::Array(Vec::new());
    }
    match v {
        Node::Array(items) => {
            if items.len() <= i {
                items.resize(i + 1, Node::Null);
            }
            &mut items[i]
        }
        _ => unreachable!("just made an array"),
    }
}

/// The place `segs` leads to in `doc`, creating objects and arrays on the way, with `idx`
/// bound to the `*`s. Stops before segment `stop`.
pub(super) fn place<'a, 'v>(
    doc: &'a mut Node<'v>,
    segs: &'v [Segment],
    idx: &[usize],
    stop: usize,
) -> &'a mut Node<'v> {
    let mut cur = doc;
    let mut bound = idx.iter();
    for seg in &segs[..stop] {
        cur = match seg {
            Segment::Key(k) => object(cur).member(Cow::Borrowed(k)),
            Segment::Index(n) if matches!(cur, Node::Object(_)) => {
                object(cur).member(Cow::Owned(n.to_string()))
            }
            Segment::Index(n) => element(cur, *n),
            Segment::Each => element(cur, bound.next().copied().unwrap_or(0)),
        };
    }
    cur
}

/// Removes what `segs` names from `v`; true when something was removed. A container the
/// removal left empty goes too, rather than staying behind as a hollow `{}` of fields that
/// were all mapped elsewhere.
fn remove(v: &mut Node<'_>, segs: &[Segment]) -> bool {
    let Some((seg, rest)) = segs.split_first() else {
        return false;
    };
    match (seg, v) {
        (Segment::Each, Node::Array(items)) => {
            if rest.is_empty() {
                let any = !items.is_empty();
                items.clear();
                return any;
            }
            let mut any = false;
            for item in items.iter_mut() {
                any |= remove(item, rest);
            }
            if any && items.iter().all(is_empty_container) {
                items.clear();
            }
            any
        }
        (Segment::Key(_) | Segment::Index(_), Node::Object(m)) => {
            let key = segment_key(seg);
            if rest.is_empty() {
                return m.remove(&key).is_some();
            }
            let Some(child) = m.get_mut(&key) else {
                return false;
            };
            let removed = remove(child, rest);
            if removed && is_empty_container(child) {
                m.remove(&key);
            }
            removed
        }
        (Segment::Index(n), Node::Array(items)) if *n < items.len() => {
            if rest.is_empty() {
                items.remove(*n);
                return true;
            }
            let removed = remove(&mut items[*n], rest);
            if removed && is_empty_container(&items[*n]) {
                items.remove(*n);
            }
            removed
        }
        _ => false,
    }
}

fn segment_key(seg: &Segment) -> Cow<'_, str> {
    match seg {
        Segment::Key(k) => Cow::Borrowed(k),
        Segment::Index(n) => Cow::Owned(n.to_string()),
        Segment::Each => Cow::Borrowed("*"),
    }
}

fn is_empty_container(v: &Node<'_>) -> bool {
    match v {
        Node::Object(m) => m.is_empty(),
        Node::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Translates a document written in `from` into the other version with `entries`.
pub fn translate_value(
    entries: &[Entry],
    from: ApiVersion,
    doc: &Value,
    unmapped: Unmapped,
) -> Result<Value, TranslateError> {
    translate_tree(entries, from, Node::from_value(doc), unmapped).map(Node::into_value)
}

/// `translate_value` on a document it may take apart: a source no later entry reads again is
/// moved into the result rather than copied (a mapped array of a 64 KB body is most of it).
pub(super) fn translate_tree<'v>(
    entries: &'v [Entry],
    from: ApiVersion,
    mut doc: Node<'v>,
    unmapped: Unmapped,
) -> Result<Node<'v>, TranslateError> {
    let to = from.other();
    let was_null = doc.is_null();
    let mut out = match unmapped {
        Unmapped::Drop => Node::Null,
        Unmapped::Keep => {
            let mut rest = doc.clone();
            for p in entries.iter().filter_map(|e| e.side(from)) {
                remove(&mut rest, &p.segments);
            }
            rest
        }
    };
    for (i, e) in entries.iter().enumerate() {
        let Some(dst) = e.side(to) else {
            continue;
        };
        let Some(src) = e.side(from) else {
            if let Some(d) = &e.default {
                *place(&mut out, &dst.segments, &[], dst.segments.len()) = Node::from_value(d);
            }
            continue;
        };
        let take = !entries[i + 1..]
            .iter()
            .filter_map(|later| later.side(from))
            .any(|p| p.overlaps(src));
        find(
            Some(&mut doc),
            &src.segments,
            &mut Vec::new(),
            &mut |found, idx| {
                match found {
                    Found::Value(v) => {
                        let v = if take { std::mem::take(v) } else { v.clone() };
                        *place(&mut out, &dst.segments, idx, dst.segments.len()) = v;
                    }
                    Found::Absent => {
                        if e.required {
                            return Err(TranslateError::MissingRequired {
                                pointer: src.text.clone(),
                            });
                        }
                        // A default needs every `*` bound to know where it goes.
                        if let (Some(d), true) = (&e.default, idx.len() == src.wildcards()) {
                            *place(&mut out, &dst.segments, idx, dst.segments.len()) =
                                Node::from_value(d);
                        }
                    }
                    Found::EmptyArray => {
                        // Keep `[]` as `[]`: the target's array at the same `*` exists, empty.
                        let stop = dst
                            .segments
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| **s == Segment::Each)
                            .nth(idx.len())
                            .map_or(dst.segments.len(), |(i, _)| i);
                        let slot = place(&mut out, &dst.segments, idx, stop);
                        if slot.is_null() {
                            *slot = Node::Array(Vec::new());
                        }
                    }
                }
                Ok(())
            },
        )?;
    }
    if out.is_null() && !was_null {
        out = Node::Object(Object::default());
    }
    Ok(out)
}
