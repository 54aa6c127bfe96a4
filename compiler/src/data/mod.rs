//! Data: what a labelled image folder holds ([`check`], `graft check-data`) and which of its
//! images train the weights, make the choices and are only measured ([`splits`]).

pub mod check;
pub mod splits;
