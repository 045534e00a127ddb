//! Every program in `examples/` runs to its end against an in-process cluster.

#![allow(dead_code)] // each example's `main` is not called here

#[path = "../examples/basics.rs"]
mod basics;
#[path = "../examples/batches.rs"]
mod batches;
#[path = "../examples/cache_aside.rs"]
mod cache_aside;
#[path = "../examples/configure.rs"]
mod configure;
#[path = "../examples/many_tasks.rs"]
mod many_tasks;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_run() {
    let cluster = twincache_orchestrator::local::LocalCluster::start(2)
        .await
        .unwrap();
    let client = twincache_client::Client::connect(&cluster.addr().to_string())
        .await
        .unwrap();
    basics::run(&client).await.unwrap();
    batches::run(&client).await.unwrap();
    cache_aside::run(&client).await.unwrap();
    configure::run(&client).await.unwrap();
    many_tasks::run(&client).await.unwrap();
}
