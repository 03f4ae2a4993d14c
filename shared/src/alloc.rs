//! The global allocator of the server, the loadgen and the CLI: mimalloc, called through its
//! plain entry points wherever they give the alignment asked for.
//!
//! The `mimalloc` crate's allocator calls `mi_malloc_aligned` for every allocation. Its fast
//! path takes a free block only if that block happens to be aligned and otherwise falls back to
//! a generic path; with the check and the fallback, the aligned calls were ~4 % of the single
//! node's user-space instructions per c2c message (callgrind, docs/BENCHMARKS.md). Every block
//! mimalloc hands out is aligned to at least a word (8 bytes: its size classes are whole words),
//! so an allocation that asks for no more than that goes to `mi_malloc` (`mi_zalloc`,
//! `mi_realloc`) directly; a larger alignment (16 and up: `u128`, cache-padded types) still goes
//! to the aligned entry points.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Alignment every block of mimalloc has.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc as the global allocator: `#[global_allocator] static A: Mimalloc = Mimalloc;`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mimalloc;

// SAFETY: each method hands the layout's size (and, above a word, its alignment) to mimalloc's
// matching entry point, which returns a block of at least that size aligned to at least a word,
// or null; blocks are freed by `mi_free` whichever entry point made them.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_malloc(layout.size()) as *mut u8
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_zalloc(layout.size()) as *mut u8
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract).
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract).
        unsafe {
            if layout.align() <= WORD {
                mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
            } else {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_the_alignment_and_contents_asked_for_through_either_path() {
        let a = Mimalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 7, 8, 9, 16, 24, 40, 100, 1000, 5000, 70_000, 3 << 20] {
                let Ok(l) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: a non-zero size; every block is freed once, with its layout.
                unsafe {
                    let p = a.alloc(l);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc {size} aligned {align}");
                    p.write_bytes(0xab, size);
                    let z = a.alloc_zeroed(l);
                    assert_eq!(z as usize % align, 0, "zalloc {size} aligned {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    let q = a.realloc(p, l, size * 3);
                    assert_eq!(q as usize % align, 0, "realloc {size} aligned {align}");
                    assert!(std::slice::from_raw_parts(q, size)
                        .iter()
                        .all(|&b| b == 0xab));
                    a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                    a.dealloc(z, l);
                }
            }
        }
    }
}
