#!/usr/bin/env node
'use strict'
const { main } = require('../dist/cli/main.js')
main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`vduse: ${err && err.message ? err.message : String(err)}\n`)
    process.exit(1)
  },
)
