//! Experiment tracking for training runs, in the formats ML-ops teams already read:
//!
//! - [`tensorboard`]: scalars as TensorBoard event files (`events.out.tfevents.*`, the
//!   `tf.Event` protobuf in TFRecord framing), readable by TensorBoard and its Python reader;
//! - [`mlflow`]: an MLflow tracking-server client over its REST API (experiments, runs,
//!   parameters, metrics, artefacts through the server's artifact proxy) and a [`mlflow::RunLogger`]
//!   that queues what a run logs and sends it in the background, so a tracking server that is
//!   slow or gone never fails or stalls training: it is reported and retried.
//!
//! No model or training types here: callers hand over names, numbers and bytes.
#![warn(missing_docs)]

pub mod mlflow;
pub mod tensorboard;
