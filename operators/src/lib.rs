//! Timely dataflow operators of dlpipe.
