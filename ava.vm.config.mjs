// In-guest suite (run through scripts/vm/run): real /dev/vduse, vdpa attach, real I/O. Files run one at a
// time because they share one kernel (module loads, device names, the vDPA bus).
export default {
  files: ['__test__/vm/**/*.spec.ts'],
  extensions: { ts: 'commonjs' },
  nodeArguments: ['--import=tsx'],
  workerThreads: false,
  cache: false,
  concurrency: 1,
  serial: true,
  timeout: '5m',
}
