// In-guest suite (run through scripts/vm/run): real /dev/vduse, vdpa attach, real I/O. Files run one at a
// time because they share one kernel (module loads, device names, the vDPA bus). The guest kernel picks
// the files: 6.12 (the default) runs everything but virtio-fs; 7.3 (VDUSE_VM_KERNEL=7.3) runs virtio-fs
// and the smoke test.
const kernel = process.env.VDUSE_VM_KERNEL ?? '6.12'
export default {
  files:
    kernel === '6.12'
      ? [
          '__test__/vm/**/*.spec.ts',
          '!__test__/vm/fs.spec.ts',
          '!__test__/vm/fs-shared.spec.ts',
          '!__test__/vm/fs-mount.spec.ts',
        ]
      : [
          '__test__/vm/fs.spec.ts',
          '__test__/vm/fs-shared.spec.ts',
          '__test__/vm/fs-mount.spec.ts',
          '__test__/vm/smoke.spec.ts',
        ],
  extensions: { ts: 'commonjs' },
  nodeArguments: ['--import=tsx'],
  workerThreads: false,
  cache: false,
  concurrency: 1,
  serial: true,
  timeout: '5m',
}
