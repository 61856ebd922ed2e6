//! Page-aligned buffers for O_DIRECT I/O.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Alignment of every [`IoBuf`]: a page, which satisfies O_DIRECT on every block size we meet.
pub const IO_ALIGN: usize = 4096;

/// An owned, zero-initialised, page-aligned byte buffer, suitable for O_DIRECT.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    /// Set when the bytes belong to a [`BufArena`] slot, returned there on drop.
    arena: Option<(Arc<BufArena>, usize)>,
}

// SAFETY: IoBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zeroed buffer of `len` bytes; its capacity is rounded up to a whole page.
    pub fn new(len: usize) -> IoBuf {
        let cap = len.max(1).div_ceil(IO_ALIGN) * IO_ALIGN;
        let layout = Layout::from_size_align(cap, IO_ALIGN).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        IoBuf {
            ptr,
            len,
            cap,
            arena: None,
        }
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Change the visible length within the capacity (new bytes keep whatever they held).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "IoBuf::set_len {len} past capacity {}",
            self.cap
        );
        self.len = len;
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Some((arena, class)) = self.arena.take() {
            arena.release(
                class,
                self.ptr.as_ptr() as usize - arena.base.as_ptr() as usize,
            );
            return;
        }
        let layout = Layout::from_size_align(self.cap, IO_ALIGN).expect("buffer layout");
        // SAFETY: allocated in `new` with this very layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf(len={})", self.len)
    }
}

/// Smallest arena slot.
const ARENA_MIN_SLOT: usize = 4096;
/// Number of slot sizes: 4 KiB << 0 ..= 4 KiB << 10 (4 MiB).
const ARENA_CLASSES: usize = 11;

/// One large page-aligned region, carved into power-of-two slots that [`IoBuf`]s borrow and give
/// back. The region is registered with every io_uring ring as fixed buffers, so I/O on arena
/// buffers skips the kernel's per-request page pinning. When the arena is exhausted, or a buffer
/// is larger than the largest slot, `alloc` falls back to a plain heap buffer.
pub struct BufArena {
    base: NonNull<u8>,
    size: usize,
    state: Mutex<ArenaState>,
}

struct ArenaState {
    /// Next never-used byte.
    bump: usize,
    /// Free slot offsets per size class.
    free: [Vec<usize>; ARENA_CLASSES],
}

// SAFETY: the region is owned by the arena; slots are handed out exclusively under the mutex.
unsafe impl Send for BufArena {}
// SAFETY: as above.
unsafe impl Sync for BufArena {}

impl BufArena {
    /// An arena of `size` bytes (rounded up to a page).
    pub fn new(size: usize) -> Arc<BufArena> {
        let size = size.max(IO_ALIGN).div_ceil(IO_ALIGN) * IO_ALIGN;
        let layout = Layout::from_size_align(size, IO_ALIGN).expect("arena layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let base = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Arc::new(BufArena {
            base,
            size,
            state: Mutex::new(ArenaState {
                bump: 0,
                free: Default::default(),
            }),
        })
    }

    /// The region as `(address, length)`, for registration with a ring.
    pub fn region(&self) -> (usize, usize) {
        (self.base.as_ptr() as usize, self.size)
    }

    /// A buffer of `len` bytes: an arena slot when one is free, else from the heap. Contents are
    /// unspecified (a reused slot keeps old bytes): callers overwrite before use.
    pub fn alloc(self: &Arc<Self>, len: usize) -> IoBuf {
        let slot = len.max(ARENA_MIN_SLOT).next_power_of_two();
        let class = (slot / ARENA_MIN_SLOT).trailing_zeros() as usize;
        if class < ARENA_CLASSES {
            let off = {
                let mut st = self.state.lock().unwrap();
                match st.free[class].pop() {
                    Some(off) => Some(off),
                    None if st.bump + slot <= self.size => {
                        st.bump += slot;
                        Some(st.bump - slot)
                    }
                    None => None,
                }
            };
            if let Some(off) = off {
                // SAFETY: off + slot <= size, inside the arena's allocation.
                let ptr = unsafe { NonNull::new_unchecked(self.base.as_ptr().add(off)) };
                return IoBuf {
                    ptr,
                    len,
                    cap: slot,
                    arena: Some((self.clone(), class)),
                };
            }
        }
        IoBuf::new(len)
    }

    fn release(&self, class: usize, off: usize) {
        self.state.lock().unwrap().free[class].push(off);
    }
}

impl Drop for BufArena {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.size, IO_ALIGN).expect("arena layout");
        // SAFETY: allocated in `new` with this very layout; every IoBuf holds an Arc, so none
        // is alive now.
        unsafe { dealloc(self.base.as_ptr(), layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let mut b = IoBuf::new(len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(7);
            assert!(b.iter().all(|&x| x == 7));
        }
    }

    #[test]
    fn arena_slots_are_reused_and_fall_back_to_heap() {
        let arena = BufArena::new(64 * 1024);
        let (start, size) = arena.region();
        let inside = |b: &IoBuf| {
            let p = b.as_ptr() as usize;
            p >= start && p + b.len() <= start + size
        };
        let a = arena.alloc(5000); // 8 KiB slot
        assert!(inside(&a) && a.as_ptr() as usize % IO_ALIGN == 0);
        let pa = a.as_ptr();
        drop(a);
        let b = arena.alloc(8192);
        assert_eq!(b.as_ptr(), pa, "freed slot reused");
        let big = arena.alloc(1 << 20); // larger than the arena: heap
        assert!(!inside(&big));
        let mut held = vec![];
        for _ in 0..14 {
            held.push(arena.alloc(4096));
        }
        assert!(held.iter().all(inside));
        let over = arena.alloc(4096 * 3); // 16 KiB slot: no room left
        assert!(!inside(&over));
    }
}
