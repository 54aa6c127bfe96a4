//! Shared helpers: the seeded random number generator every random choice draws from, and the
//! unit tests' graph helpers.

pub mod rng;

#[cfg(test)]
pub(crate) mod testing;
