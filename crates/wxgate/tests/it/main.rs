//! Integration tests: one binary, a module per area, sharing `helpers`.
#![allow(unreachable_pub, dead_code)]

mod api;
mod bad_input;
mod cases;
mod cli;
mod cluster;
mod crash;
mod demo;
mod forward;
mod helpers;
mod hostile;
mod nats;
mod ops;
mod redis;
mod services;
mod sim;
mod store;
