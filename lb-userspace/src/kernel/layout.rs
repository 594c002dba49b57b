//! The pinned maps' layout across agent versions. Beside the pins lies a record of the
//! layout version they were made with (`lb_common::LAYOUT_VERSION`): an empty directory
//! `layout-vN`, as bpffs holds no regular files. Pins without a record are version 0, the
//! layout up to commit 4fe7cc3. The shape of each map (type, key and value size, entries)
//! is the kernel's to tell, from the pin itself (`bpf_map_info`).
//!
//! When the pins cannot be reused as they are (a map of another size, e.g. `--max-flows`
//! changed), their contents are copied into new maps of this binary's shapes, map by map,
//! entry by entry; a map whose value grew at its end by fields where zero means "none"
//! (`ZERO_EXTENDED`) is copied with zeros appended; any other change of key or value shape
//! cannot be copied and the upgrade is refused before anything changes, so the old program
//! keeps forwarding.
//!
//! A map added since (the full-NAT maps `NAT_SNAT`, `NAT_FWD`, `NAT_REV`, `NAT_STATS`, in
//! layout 2) has no pin in an older agent's directory: it is created empty and pinned, which
//! is what it meant there (no translation, no SNAT address), so no version bump is needed.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{MapData, MapInfo, MapType};
use lb_common::LAYOUT_VERSION;

const RECORD_PREFIX: &str = "layout-v";

/// Layout versions whose maps mean what this binary's mean (same types, same sizes give
/// the same meaning): their pins are reused, or copied when only sizes differ. A version
/// that changes a map's meaning at equal size needs its own migration step here.
const SAME_MEANING: [u32; 3] = [0, 1, 2];

/// Maps whose value grew at its end, since an older layout, by fields where zero means
/// "none" (see `lb_common::LAYOUT_VERSION`): an older entry is copied with zeros appended.
const ZERO_EXTENDED: [&str; 1] = [lb_common::maps::VIPS];
const _: () = assert!(SAME_MEANING[SAME_MEANING.len() - 1] == LAYOUT_VERSION);

/// The version recorded in `pin_dir`: 0 for pins older than the record.
pub fn recorded(pin_dir: &Path) -> Result<u32> {
    let mut found = None;
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Ok(0);
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(v) = name.to_str().and_then(|n| n.strip_prefix(RECORD_PREFIX)) else {
            continue;
        };
        let v: u32 = v
            .parse()
            .with_context(|| format!("{}: unreadable layout record", pin_dir.display()))?;
        found = Some(found.map_or(v, |f: u32| f.max(v)));
    }
    Ok(found.unwrap_or(0))
}

/// Records this binary's layout version in `pin_dir`, replacing any other record.
pub fn record(pin_dir: &Path) -> Result<()> {
    let want = pin_dir.join(format!("{RECORD_PREFIX}{LAYOUT_VERSION}"));
    if !want.exists() {
        std::fs::create_dir(&want).with_context(|| format!("creating {}", want.display()))?;
    }
    for entry in std::fs::read_dir(pin_dir)?.flatten() {
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.starts_with(RECORD_PREFIX)) && entry.path() != want {
            std::fs::remove_dir(entry.path())?;
        }
    }
    Ok(())
}

/// Refuses pins of a layout this binary cannot take over, with one line saying what to do.
pub fn check_version(pin_dir: &Path) -> Result<u32> {
    let version = recorded(pin_dir)?;
    if !SAME_MEANING.contains(&version) {
        bail!(
            "{}: the pinned maps have layout version {version}, this lb knows {SAME_MEANING:?}; \
             nothing was changed and the running program keeps forwarding (run the lb that \
             made them, or stop it without --keep-forwarding to start afresh)",
            pin_dir.display()
        );
    }
    Ok(version)
}

/// Whether `err` is aya refusing a pinned map of another shape than the program's.
pub fn is_incompatible_pin(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        matches!(
            e.downcast_ref::<aya::EbpfError>(),
            Some(aya::EbpfError::MapError(
                aya::maps::MapError::IncompatiblePinnedMap { .. }
            ))
        )
    })
}

/// Where a migration pins the new maps until the program using them is attached (bpffs
/// names may not hold a dot).
pub fn next_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps-next")
}

/// Checks every pinned map in `old` can be copied into its namesake in `new` (same type,
/// key and value size), before anything is copied.
pub fn check_copyable(old: &Path, new: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        let (o, n) = (old.join(name), new.join(name));
        if !o.exists() {
            continue; // a map new in this layout starts empty
        }
        let (oi, ni) = (info(&o)?, info(&n)?);
        let shape = |i: &MapInfo| (type_of(i), i.key_size(), i.value_size());
        let grown = ZERO_EXTENDED.contains(name)
            && (type_of(&oi), oi.key_size()) == (type_of(&ni), ni.key_size())
            && oi.value_size() < ni.value_size();
        if shape(&oi) != shape(&ni) && !grown {
            bail!(
                "{}: pinned map {name} (type {}, key {} B, value {} B) cannot become this \
                 lb's (type {}, key {} B, value {} B); nothing was changed and the running \
                 program keeps forwarding",
                old.display(),
                type_of(&oi),
                oi.key_size(),
                oi.value_size(),
                type_of(&ni),
                ni.key_size(),
                ni.value_size()
            );
        }
    }
    Ok(())
}

/// The kernel's `bpf_map_type` number (-1 for one aya does not know).
fn type_of(i: &MapInfo) -> i64 {
    i.map_type().map_or(-1, |t| t as i64)
}

fn info(path: &Path) -> Result<MapInfo> {
    MapInfo::from_pin(path).with_context(|| format!("reading the map pinned at {}", path.display()))
}

/// Copies every entry of the map pinned at `old` into the one pinned at `new` (shapes
/// checked by `check_copyable`; a longer value in `new` gets zeros appended).
/// `only_missing` leaves entries `new` has alone (a second pass for flows the old program
/// made meanwhile). Entries `new` has no room for (a smaller array) are left out. Returns
/// how many were copied.
pub fn copy(old: &Path, new: &Path, only_missing: bool) -> Result<usize> {
    let i = info(old)?;
    if matches!(i.map_type(), Ok(MapType::RingBuf)) {
        return Ok(0); // events in flight, not state: the agent reads what the new one gets
    }
    let (from, to) = (open(old)?, open(new)?);
    let to_value_size = info(new)?.value_size() as usize;
    let per_cpu = matches!(
        i.map_type(),
        Ok(MapType::PerCpuHash | MapType::PerCpuArray | MapType::LruPerCpuHash)
    );
    let cpus = if per_cpu {
        aya::util::nr_cpus().map_err(|(_, e)| e)?.get() as usize
    } else {
        1
    };
    let value_len = if per_cpu {
        (i.value_size() as usize).div_ceil(8) * 8 * cpus
    } else {
        i.value_size() as usize
    };
    let key_size = i.key_size() as usize;
    let (from, to) = (from.fd().as_fd(), to.fd().as_fd());
    let flags = if only_missing { BPF_NOEXIST } else { BPF_ANY };
    // Thousands of entries a syscall where the map type has batches (arrays, hashes: the
    // ring slab has millions of slots), one at a time where not (LPM tries, devmaps).
    const CHUNK: usize = 8192;
    let rounds = (i.max_entries() as usize).div_ceil(CHUNK) * 2 + 2;
    let mut copied = 0;
    let batched = super::batch::lookup_raw(
        from,
        key_size,
        value_len,
        CHUNK,
        rounds,
        &mut |keys, values| {
            let n = keys.len() / key_size;
            let padded;
            let (values, value_len) = if to_value_size > value_len && !per_cpu {
                padded = zero_extend(values, value_len, to_value_size);
                (&padded[..], to_value_size)
            } else {
                (values, value_len)
            };
            let (done, result) = if only_missing {
                (0, Err(std::io::Error::from_raw_os_error(libc::EEXIST)))
            } else {
                super::batch::update_raw(to, keys, values, n, flags)
            };
            copied += done;
            if result.is_err() {
                // Entry by entry from where the batch stopped, leaving out those `new` has (or
                // has no room for).
                for j in done..n {
                    let (k, v) = (
                        &keys[j * key_size..][..key_size],
                        &values[j * value_len..][..value_len],
                    );
                    copied += put(to, k, v, flags)?;
                }
            }
            Ok(())
        },
    );
    match batched {
        Ok(()) => return Ok(copied),
        Err(e) if copied == 0 && matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {}
        Err(e) => return Err(e).with_context(|| format!("copying {}", old.display())),
    }
    let mut key = vec![0u8; key_size];
    let mut next = key.clone();
    let mut value = vec![0u8; value_len];
    let mut first = true;
    // Bounded by the map's size: a hash map being changed under the walk may restart it.
    for _ in 0..=2 * u64::from(i.max_entries()) {
        match elem(
            BPF_MAP_GET_NEXT_KEY,
            from,
            (!first).then_some(&key[..]),
            next.as_mut_ptr(),
            0,
        ) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e).with_context(|| format!("walking {}", old.display())),
        }
        first = false;
        key.copy_from_slice(&next);
        match elem(BPF_MAP_LOOKUP_ELEM, from, Some(&key), value.as_mut_ptr(), 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue, // gone meanwhile
            Err(e) => return Err(e).with_context(|| format!("reading {}", old.display())),
        }
        let value = if to_value_size > value_len && !per_cpu {
            zero_extend(&value, value_len, to_value_size)
        } else {
            value.clone()
        };
        copied +=
            put(to, &key, &value, flags).with_context(|| format!("writing {}", new.display()))?;
    }
    Ok(copied)
}

/// `values` (each `from` bytes) with each one followed by zeros up to `to` bytes.
fn zero_extend(values: &[u8], from: usize, to: usize) -> Vec<u8> {
    values
        .chunks(from)
        .flat_map(|v| v.iter().copied().chain(std::iter::repeat_n(0, to - from)))
        .collect()
}

/// The kernel's ENOTSUPP (not in libc): a map type without batch operations.
const ENOTSUPP: i32 = 524;

/// Writes one entry; 0 when `to` has it already (BPF_NOEXIST) or has no room for it.
fn put(to: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> std::io::Result<usize> {
    match elem(
        BPF_MAP_UPDATE_ELEM,
        to,
        Some(key),
        value.as_ptr() as *mut u8,
        flags,
    ) {
        Ok(()) => Ok(1),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::E2BIG)) => Ok(0),
        Err(e) => Err(e),
    }
}

fn open(path: &Path) -> Result<MapData> {
    MapData::from_pin(path).with_context(|| format!("opening the map pinned at {}", path.display()))
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// The element-command member of the kernel's `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value` or `next_key`.
    value: u64,
    flags: u64,
}

/// One element command on `fd`. `out` must hold the map's key (GET_NEXT_KEY) or value
/// size (it is only read by UPDATE_ELEM); `key` the key size.
fn elem(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    key: Option<&[u8]>,
    out: *mut u8,
    flags: u64,
) -> std::io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value: out as u64,
        flags,
    };
    // SAFETY: `attr` is a valid `union bpf_attr` prefix of the size given; its pointers
    // are the caller's buffers of the map's key and value sizes, alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Removes a migration left half-done (new maps pinned, never attached).
pub fn discard_next(pin_dir: &Path) -> Result<()> {
    let next = next_dir(pin_dir);
    if next.exists() {
        log::warn!("{}: an unfinished upgrade, discarding it", next.display());
        std::fs::remove_dir_all(&next).with_context(|| format!("removing {}", next.display()))?;
    }
    Ok(())
}
