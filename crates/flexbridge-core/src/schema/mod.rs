//! Versioned output schemas. Each published version is a module and never changes in place:
//! a change to the envelope or to any event's `data` is a new module (`v2`) with new schema
//! files, and golden files pin what every version emits.

pub mod v1;
