//! A check of an MP4 file's box tree before the `mp4` crate parses it.
//!
//! The demuxer loops forever on a nested box of size 0 (it seeks back to the same header; found
//! by `fuzz/`'s `mp4_reader`) and reserves `entry_count` entries of a sample table before
//! reading one (up to 4 G entries). This walk checks that every box of the containers the
//! demuxer descends into has a valid size inside its parent, and that each sample table's
//! entries fit in its box, so that the demuxer only sees files it parses in bounded time and
//! memory.

/// Boxes holding only boxes.
const CONTAINERS: [&[u8; 4]; 12] = [
    b"moov", b"trak", b"mdia", b"minf", b"stbl", b"dinf", b"edts", b"mvex", b"moof", b"traf",
    b"udta", b"ilst",
];

/// Boxes holding boxes after fields of a fixed size: the sample description (version, flags,
/// count), the data references, and the sample entries the demuxer reads.
const PREFIXED_CONTAINERS: [(&[u8; 4], usize); 6] = [
    (b"stsd", 8),
    (b"dref", 8),
    (b"avc1", 78),
    (b"hev1", 78),
    (b"vp09", 78),
    (b"mp4a", 28),
];

/// Sample tables: the offset of `entry_count` after the box header and the bytes per entry.
const TABLES: [(&[u8; 4], usize, usize); 6] = [
    (b"stts", 4, 8),
    (b"ctts", 4, 8),
    (b"stss", 4, 4),
    (b"stsc", 4, 12),
    (b"stco", 4, 4),
    (b"co64", 4, 8),
];

/// Checks the box tree of a whole file; `Err` says which box is wrong and where.
pub(crate) fn check_boxes(file: &[u8]) -> Result<(), String> {
    check_children(file, 0, file.len(), true, 0)
}

/// Boxes nested deeper than this are refused (the demuxer recurses per level).
const MAX_DEPTH: usize = 16;

/// Checks the boxes that fill `file[start..end]`; `top` allows the size-0 ("to the end")
/// box, which only the demuxer's top level handles.
fn check_children(
    file: &[u8],
    start: usize,
    end: usize,
    top: bool,
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "boxes nested more than {MAX_DEPTH} deep at byte {start}"
        ));
    }
    let mut at = start;
    while at < end {
        let (kind, header, size) = match read_header(file, at, end, top)? {
            Some(parsed) => parsed,
            None => return Ok(()),
        };
        let box_end = at + size;
        let payload = at + header;
        let inner = |skip: usize| check_children(file, payload + skip, box_end, false, depth + 1);
        if CONTAINERS.contains(&&kind) {
            inner(0)?;
        } else if let Some(&(_, skip)) = PREFIXED_CONTAINERS.iter().find(|(k, _)| **k == kind) {
            if payload + skip <= box_end {
                inner(skip)?;
            }
        } else if kind == *b"meta" {
            // A full box in ISO files, a plain container in QuickTime ones: either will do.
            inner(4).or_else(|_| inner(0))?;
        } else if is_ilst_item(file, start) {
            inner(0)?;
        } else {
            check_table(file, &kind, payload, box_end)?;
        }
        at = box_end;
    }
    Ok(())
}

/// Whether the boxes starting at `start` are the items of an `ilst` (their parent's type sits
/// in the four bytes before them), which hold `data` boxes.
fn is_ilst_item(file: &[u8], start: usize) -> bool {
    start >= 4 && &file[start - 4..start] == b"ilst"
}

/// `(type, header bytes, box bytes)` of the box at `at`, or `None` for a top-level size-0 box
/// (the demuxer stops there).
fn read_header(
    file: &[u8],
    at: usize,
    end: usize,
    top: bool,
) -> Result<Option<([u8; 4], usize, usize)>, String> {
    let field = |offset: usize, width: usize| -> Result<&[u8], String> {
        file.get(at + offset..at + offset + width)
            .filter(|_| at + offset + width <= end)
            .ok_or_else(|| format!("a box header at byte {at} runs past its parent"))
    };
    let size32 = u32::from_be_bytes(field(0, 4)?.try_into().map_err(|_| "header")?);
    let kind: [u8; 4] = field(4, 4)?.try_into().map_err(|_| "header")?;
    let name = String::from_utf8_lossy(&kind).into_owned();
    let (header, size) = match size32 {
        0 if top => return Ok(None),
        0 => {
            return Err(format!(
                "box `{name}` at byte {at} has size 0 inside another box"
            ))
        }
        1 => {
            let large = u64::from_be_bytes(field(8, 8)?.try_into().map_err(|_| "header")?);
            (16, usize::try_from(large).unwrap_or(usize::MAX))
        }
        size => (8, size as usize),
    };
    if size < header || size > end - at {
        return Err(format!(
            "box `{name}` at byte {at} has size {size}, outside {header}..={}",
            end - at
        ));
    }
    Ok(Some((kind, header, size)))
}

/// A sample table's entries fit in its box.
fn check_table(file: &[u8], kind: &[u8; 4], payload: usize, box_end: usize) -> Result<(), String> {
    let read_u32 = |offset: usize| {
        file.get(offset..offset + 4)
            .filter(|_| offset + 4 <= box_end)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let name = String::from_utf8_lossy(kind);
    let (count, entry, first) =
        if let Some(&(_, offset, entry)) = TABLES.iter().find(|(k, _, _)| *k == kind) {
            (read_u32(payload + offset), entry, payload + offset + 4)
        } else if kind == b"elst" {
            // Version 1 entries hold 64-bit times.
            let entry = if file.get(payload) == Some(&1) {
                20
            } else {
                12
            };
            (read_u32(payload + 4), entry, payload + 8)
        } else if kind == b"stsz" {
            // version/flags, sample_size, sample_count; sizes follow only when sample_size is 0.
            let entry = if read_u32(payload + 4) == Some(0) {
                4
            } else {
                0
            };
            (read_u32(payload + 8), entry, payload + 12)
        } else {
            return Ok(());
        };
    let count = count.ok_or_else(|| format!("box `{name}` is too short for its entry count"))?;
    match count
        .checked_mul(entry)
        .and_then(|bytes| bytes.checked_add(first))
    {
        Some(table_end) if table_end <= box_end => Ok(()),
        _ => Err(format!(
            "box `{name}` claims {count} entries, more than its {} bytes hold",
            box_end - payload
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(kind: &[u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut bytes = ((payload.len() + 8) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(kind);
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn a_nested_box_of_size_zero_is_refused() {
        let moof = boxed(b"moof", &[0, 0, 0, 0, b'f', b'r', b'e', b'e']);
        let error = check_boxes(&moof).unwrap_err();
        assert!(error.contains("size 0"), "{error}");
        // At the top level it means "to the end of the file", as the demuxer reads it.
        let mut top = boxed(b"ftyp", b"isom");
        top.extend_from_slice(&[0, 0, 0, 0, b'm', b'd', b'a', b't', 1, 2, 3]);
        check_boxes(&top).unwrap();
    }

    #[test]
    fn tables_claiming_more_entries_than_they_hold_are_refused() {
        let mut stts = vec![0, 0, 0, 0];
        stts.extend_from_slice(&u32::MAX.to_be_bytes());
        let file = boxed(b"moov", &boxed(b"stbl", &boxed(b"stts", &stts)));
        assert!(check_boxes(&file).unwrap_err().contains("entries"));
        let mut fine = vec![0, 0, 0, 0, 0, 0, 0, 1];
        fine.extend_from_slice(&[0, 0, 0, 5, 0, 0, 3, 232]);
        check_boxes(&boxed(b"moov", &boxed(b"stbl", &boxed(b"stts", &fine)))).unwrap();
    }

    #[test]
    fn a_child_larger_than_its_parent_is_refused() {
        let mut moov = boxed(b"moov", &boxed(b"trak", &[]));
        moov[11] = 200; // trak's size
        assert!(check_boxes(&moov).unwrap_err().contains("trak"));
    }
}
