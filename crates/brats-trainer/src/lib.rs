//! SegResNet training for BraTS, as MONAI's `brats_mri_segmentation` bundle trains it.
//!
//! The library is what both the offline CLI (`brats-trainer train`) and the trainer service
//! (`brats-trainer serve`, which launches one `brats-trainer worker` process per device) run:
//!
//! - [`spec`]: a job's spec with the bundle's defaults filled in and every field validated;
//! - [`data`]: cached preprocessed cases, the training sampler and prefetching loader threads;
//! - [`loss`], [`metric`], [`optim`]: MONAI's DiceLoss and DiceMetric, Adam/AdamW, cosine LR
//!   and a GradScaler, all with state that checkpoints capture;
//! - [`dist`]: c10d process groups (Gloo on CPU, NCCL on CUDA) behind a TCPStore rendezvous
//!   that takes torchrun's settings;
//! - [`train`]: the loop; [`checkpoint`]: what a resume needs, written atomically;
//! - [`events`]: what a job reports; [`jobs`], [`launcher`], [`service`]: durable jobs in the
//!   object store and the gRPC service over them; [`plot`]: the PNG of the training curves.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dataset;
pub mod dist;
pub mod events;
pub mod jobs;
pub mod launcher;
pub mod loss;
pub mod metric;
pub mod optim;
pub mod plot;
pub mod server;
pub mod service;
pub mod spec;
pub mod train;
