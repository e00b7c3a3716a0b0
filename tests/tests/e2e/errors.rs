//! Every refusal of `docs/api.md`: the right status, a one-line
//! `text/plain` message that says what is wrong, the right headers, and
//! not one byte of the image changed.
