//! Constrained decoding of JSON: a schema compiled into a grammar, the grammar's state over
//! the bytes written so far, and a logits processor that forbids every token that would leave
//! it, so that the output is JSON valid against the schema (`response_format`).

mod grammar;
mod processor;
mod schema;
mod vocab;

pub use grammar::JsonState;
pub use processor::JsonSchemaProcessor;
pub use schema::JsonSchema;
pub use vocab::TokenTrie;
