//! Batched map access (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`, Linux 5.6), which
//! aya 0.16 does not wrap: thousands of entries a syscall instead of one each. The one
//! place that builds the kernel's `union bpf_attr` for it.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use bytemuck::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs one batch command. Safety: `attr` must point at buffers that hold `count` keys
/// and values of the map's sizes (and the batch tokens), live for the call.
unsafe fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: the caller vouches for the buffers; `attr` itself is a valid, writable
    // `union bpf_attr` prefix of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes `values[i]` under `keys[i]` for every i, in one syscall. `K` and `V` must be the
/// map's key and value types (for per-CPU maps the value is not this shape: not for them).
pub fn update<K: Pod, V: Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> std::io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let (keys_raw, values_raw) = (bytemuck::cast_slice(keys), bytemuck::cast_slice(values));
    // BPF_ANY (0): a key there or not.
    update_raw(fd, keys_raw, values_raw, keys.len(), 0).1
}

/// What a batch lookup hands over after each syscall: the keys and values the kernel
/// wrote, entry after entry.
pub type EachBatch<'a, K, V> = dyn FnMut(&[K], &[V]) -> std::io::Result<()> + 'a;

/// Reads a whole map, `chunk` entries a syscall, handing each batch's values to `each`.
/// `token` is the type of the map's batch cursor: `u32` for arrays (the next index) and
/// for hash maps (a bucket number). Values of per-CPU maps come as `ncpus` consecutive
/// `V`s per key (each rounded up to 8 bytes by the kernel: `V` must be a multiple of 8).
pub fn lookup<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    chunk: usize,
    values_per_key: usize,
    max_rounds: usize,
    each: &mut dyn FnMut(&[K], &[V]),
) -> std::io::Result<()> {
    lookup_rounds(fd, chunk, 1, values_per_key, max_rounds, &mut |k, v| {
        each(k, v);
        Ok(())
    })
}

/// Like [`lookup`] for a map whose key and value sizes are known only at run time (copying
/// pinned maps of another layout): `key_size` and `value_len` bytes per entry (for per-CPU
/// maps, every CPU's value). `each` gets the batch's keys and values, back to back.
pub fn lookup_raw(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_len: usize,
    chunk: usize,
    max_rounds: usize,
    each: &mut EachBatch<'_, u8, u8>,
) -> std::io::Result<()> {
    lookup_rounds(fd, chunk, key_size, value_len, max_rounds, each)
}

/// The batch walk both lookups share: at most `max_rounds` BPF_MAP_LOOKUP_BATCH calls of
/// `chunk` entries, an entry being `key_elems` `K`s and `value_elems` `V`s (elements of
/// any Pod type), handing `batch` the entries the kernel wrote after each.
fn lookup_rounds<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    chunk: usize,
    key_elems: usize,
    value_elems: usize,
    max_rounds: usize,
    batch: &mut EachBatch<'_, K, V>,
) -> std::io::Result<()> {
    let mut keys = vec![K::zeroed(); chunk * key_elems];
    let mut values = vec![V::zeroed(); chunk * value_elems];
    let (mut token, mut next) = (0u32, 0u32);
    for round in 0..max_rounds {
        let mut attr = BatchAttr {
            in_batch: if round == 0 {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most `count` keys and values of the map's sizes
        // into buffers sized above for that many, and a u32 into `next`; all are
        // borrowed mutably here across the call.
        let result = unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let done = match result {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let n = (attr.count as usize).min(chunk);
        batch(&keys[..n * key_elems], &values[..n * value_elems])?;
        if done {
            return Ok(());
        }
        token = next;
    }
    Ok(())
}

/// Like [`update`] for run-time sizes: `count` keys and values back to back in `keys` and
/// `values`, with `elem_flags` (BPF_ANY, BPF_NOEXIST). Returns how many were written
/// before an error stopped the batch, with the error.
pub fn update_raw(
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
    elem_flags: u64,
) -> (usize, std::io::Result<()>) {
    if count == 0 {
        return (0, Ok(()));
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags,
        ..Default::default()
    };
    // SAFETY: `count` keys and values of the map's sizes in the buffers, alive across the
    // call; the kernel only reads them (and writes back `count` into `attr`).
    let r = unsafe { bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr) };
    ((attr.count as usize).min(count), r)
}
