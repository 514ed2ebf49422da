// A backend plugin for the restart test: a file-backed disk whose every request takes 20 ms (a slow remote
// store), so a server killed at any moment has requests in flight. Usage:
//   vduse blk --backend __test__/vm-host/slow-file.cjs -- PATH SIZE
const fs = require('node:fs')

module.exports = ({ args }) => {
  const [path, sizeText] = args
  const size = Number(sizeText)
  const fd = fs.openSync(path, fs.existsSync(path) ? 'r+' : 'w+')
  if (fs.fstatSync(fd).size < size) fs.ftruncateSync(fd, size)
  const later = (fn) =>
    new Promise((resolve, reject) =>
      setTimeout(() => {
        try {
          fn()
          resolve()
        } catch (err) {
          reject(err)
        }
      }, 20),
    )
  return {
    size,
    id: `slow-file:${path}`,
    capabilities: { flush: true },
    read: (io) =>
      later(() => {
        const b = Buffer.alloc(io.length)
        fs.readSync(fd, b, 0, io.length, io.offset)
        io.copyFrom(b)
      }),
    write: (io) =>
      later(() => {
        const b = Buffer.alloc(io.length)
        io.copyTo(b)
        fs.writeSync(fd, b, 0, io.length, io.offset)
      }),
    flush: () => later(() => fs.fsyncSync(fd)),
    close: () => fs.closeSync(fd),
  }
}
