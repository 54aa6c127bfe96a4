//! Which instruction set the kernels use: detected once per process, capped by the
//! `GRAFT_KERNELS` environment variable, and passed explicitly to every kernel so that tests can
//! run each level the machine supports against the same reference.
//!
//! | level | f32 products | int8 products |
//! |---|---|---|
//! | `avx512` | AVX-512F, 8 x 48 tiles | AVX-512 VNNI (`vpdpbusd`, u8 x s8), 8 x 48 tiles |
//! | `avxvnni` | AVX2 + FMA, 6 x 16 tiles | AVX-VNNI (`vpdpbusd` on 256 bits), 6 x 16 tiles |
//! | `avx2` | AVX2 + FMA, 6 x 16 tiles | 16-bit pair products (`vpmaddwd`), 4 x 8 tiles |
//! | `portable` | plain Rust the compiler vectorises (NEON on aarch64) | plain Rust |

use std::sync::OnceLock;

/// An instruction-set level, from the least to the most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Plain Rust (vectorised by the compiler for the build's baseline: SSE2, NEON).
    Portable,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX2, FMA and AVX-VNNI (256-bit u8 x s8 dot products).
    AvxVnni,
    /// x86-64 with AVX-512 F, BW, VL and VNNI.
    Avx512,
}

/// The environment variable that caps the level (`portable`, `avx2`, `avxvnni`, `avx512`).
pub const ENV: &str = "GRAFT_KERNELS";

impl Level {
    /// Every level, least capable first.
    pub const ALL: [Level; 4] = [Level::Portable, Level::Avx2, Level::AvxVnni, Level::Avx512];

    /// The name `GRAFT_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::AvxVnni => "avxvnni",
            Level::Avx512 => "avx512",
        }
    }

    /// The level named `name`.
    pub fn parse(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Whether this CPU can run the level's kernels.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            match self {
                Level::Portable => true,
                Level::Avx2 => avx2,
                Level::AvxVnni => avx2 && has!("avxvnni"),
                Level::Avx512 => {
                    has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Level::Portable
        }
    }

    /// The levels this CPU supports, least capable first.
    pub fn available() -> Vec<Level> {
        Level::ALL.into_iter().filter(|l| l.supported()).collect()
    }

    /// The level the kernels use in this process: the most capable one the CPU supports, capped
    /// by `GRAFT_KERNELS` when it names a level (an unknown name is reported once on stderr and
    /// ignored). Chosen on first use and kept.
    pub fn current() -> Level {
        static CURRENT: OnceLock<Level> = OnceLock::new();
        *CURRENT.get_or_init(|| {
            let best = Level::available().into_iter().max().unwrap_or(Level::Portable);
            match std::env::var(ENV) {
                Ok(name) => match Level::parse(name.trim()) {
                    Some(cap) => best.min(cap),
                    None => {
                        crate::progress::note(format_args!(
                            "warning: {ENV}={name:?} is not one of portable, avx2, avxvnni, avx512; using {}",
                            best.name()
                        ));
                        best
                    }
                },
                Err(_) => best,
            }
        })
    }
}

/// How graft's kernels lay out the activations between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// tract's channel-major tensors throughout.
    Plain,
    /// Runs of graft's f32 pointwise and depthwise convolutions in the 16-channel-blocked layout
    /// ([`layout`](super::layout)); AVX-512 only (other levels run plain).
    Blocked,
}

/// The environment variable that picks the layout (`plain`, `blocked`).
pub const LAYOUT_ENV: &str = "GRAFT_LAYOUT";

impl Layout {
    /// The name `GRAFT_LAYOUT` takes.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Plain => "plain",
            Layout::Blocked => "blocked",
        }
    }

    /// The layout graft's kernels use at `level`: blocked only at AVX-512 (the blocked
    /// kernels need it), plain otherwise.
    pub fn at(self, level: Level) -> Layout {
        if level == Level::Avx512 && cfg!(target_arch = "x86_64") {
            self
        } else {
            Layout::Plain
        }
    }

    /// The layout this process uses: `blocked` unless `GRAFT_LAYOUT=plain` (an unknown name is
    /// reported once on stderr and ignored). Chosen on first use and kept.
    pub fn current() -> Layout {
        static CURRENT: OnceLock<Layout> = OnceLock::new();
        *CURRENT.get_or_init(|| match std::env::var(LAYOUT_ENV) {
            Ok(name) if name.trim() == "plain" => Layout::Plain,
            Ok(name) if name.trim() == "blocked" => Layout::Blocked,
            Ok(name) => {
                crate::progress::note(format_args!(
                    "warning: {LAYOUT_ENV}={name:?} is not one of plain, blocked; using blocked"
                ));
                Layout::Blocked
            }
            Err(_) => Layout::Blocked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_portable_is_always_there() {
        for level in Level::ALL {
            assert_eq!(Level::parse(level.name()), Some(level));
        }
        assert_eq!(Level::parse("sse9"), None);
        assert!(Level::available().contains(&Level::Portable));
        assert!(Level::current().supported());
    }
}
