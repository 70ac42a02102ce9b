//! The compile cache: content-addressed keys (`key`), the on-disk store with
//! atomic commits and LRU eviction (`store`), and single-flight compiles with
//! observable progress (`flight`).

pub mod flight;
pub mod key;
pub mod store;

pub use flight::{CompileState, FlightView, InFlight, Leader, Role};
pub use key::{CacheKey, KeyInputs, canonical_options};
pub use store::{CacheStore, EntryView, Pin, Staging, StoreError};
