#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() {
    let ex = glommio::LocalExecutorBuilder::default().io_memory(1 << 20).make().unwrap();
    ex.run(async { glommio::timer::sleep(std::time::Duration::from_millis(10)).await; println!("glommio ok"); });
}
