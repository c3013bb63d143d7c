//! SegResNet training for BraTS, as MONAI's `brats_mri_segmentation` bundle trains it: the
//! library behind both the offline CLI (`brats-trainer train`) and every worker process of the
//! trainer service (`brats-trainer worker`). No service code lives here: the job store, the
//! launcher and the gRPC service are in `brats-trainer`.
//!
//! - [`spec`]: a job's spec with the bundle's defaults filled in and every field validated;
//! - [`dataset`]: the datalist preprocessed into cached volumes and a manifest;
//! - [`data`]: cached preprocessed cases, the augmentation, the training sampler and
//!   prefetching loader threads;
//! - [`loss`], [`metric`], [`optim`]: MONAI's DiceLoss and DiceMetric, Adam/AdamW, cosine LR
//!   and a GradScaler, all with state that checkpoints capture;
//! - [`dist`]: c10d process groups (Gloo on CPU, NCCL on CUDA) behind a TCPStore rendezvous
//!   that takes torchrun's settings;
//! - [`train`]: the loop ([`train::Trainer`]); [`checkpoint`]: what a resume needs, written
//!   atomically;
//! - [`events`]: what a job reports (`@brats-worker {json}` lines);
//! - [`report`]: `metrics.csv` and the PNG of the training curves.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod dataset;
pub mod dist;
pub mod events;
pub mod loss;
pub mod metric;
pub mod optim;
pub mod report;
pub mod spec;
pub mod train;
