// Host suite: no kernel needed. The kernel path runs in the guest with ava.vm.config.mjs.
export default {
  files: ['__test__/*.spec.ts'],
  extensions: { ts: 'commonjs' },
  nodeArguments: ['--import=tsx'],
  workerThreads: false,
  cache: false,
  timeout: '2m',
}
