// Host-side specs that boot the test guest themselves (scripts/vm/run with extra devices): a VM whose disk
// and NIC are served over vhost-user by vduse on this host. One at a time: they share the guest harness.
export default {
  files: ['__test__/vm-host/*.spec.ts'],
  extensions: { ts: 'commonjs' },
  nodeArguments: ['--import=tsx'],
  workerThreads: false,
  cache: false,
  concurrency: 1,
  serial: true,
  timeout: '10m',
}
