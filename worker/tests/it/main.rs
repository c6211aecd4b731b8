//! The distributed rotation end to end: real PostgreSQL, real RabbitMQ, a fresh database
//! and fresh queue names per test, workers and the coordinator driven in-process through
//! the same library functions the binaries call.

mod audit;
mod helpers;
mod pipeline;
mod staged;
