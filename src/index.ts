export { AbortError, ERROR_CODES, VduseError } from './errors'
export type { VduseErrorCode, VduseErrorOptions } from './errors'
export {
  getApiVersion,
  kernelSupport,
  listDevices,
  destroyDevice,
  removeStaleDevice,
  inspectState,
} from './control'
export type { DeviceState, KernelSupport } from './control'

export { VirtioDevice } from './virtio/device'
export type { VirtioDeviceOptions, AttachOptions, VirtioDeviceEvents, DrainInfo } from './virtio/device'
export { FeatureSet, TRANSPORT_FEATURES } from './virtio/features'
export type { FeatureDefinition } from './virtio/features'
export { ConfigLayout } from './virtio/config-layout'
export type { FieldDefinition, FieldType, ConfigValues } from './virtio/config-layout'
export { STATUS, statusNames } from './virtio/status'

export { BlockDevice } from './devices/blk/block-device'
export type { BlockDeviceOptions, BlockStats } from './devices/blk/block-device'
export { BLK_FEATURES, BLK_STATUS, REQ as BLK_REQUEST } from './devices/blk/constants'
export type { BlkFeature } from './devices/blk/constants'

export { NetDevice, formatMac } from './devices/net/net-device'
export type { NetDeviceOptions, NetDeviceEvents, NetHeader, NetStats } from './devices/net/net-device'
export { NetSwitch } from './devices/net/switch'
export type { NetSwitchStats, NetSwitchOptions } from './devices/net/switch'
export { NET_FEATURES, GSO as NET_GSO } from './devices/net/constants'
export type { NetFeature } from './devices/net/constants'

export { FsDevice, VIRTIO_ID_FS } from './devices/fs/fs-device'
export type { FsDeviceOptions, FsDeviceEvents, FsStats } from './devices/fs/fs-device'
export { FsError, PassthroughMount } from './devices/fs/filesystem'
export type {
  FileSystem,
  FsContext,
  Entry,
  MountEntry,
  PassthroughMountOptions,
  OpenResult,
  SetAttr,
  DirEntry,
  StatFs,
  FileIo,
  FsInitInfo,
  Attr,
  Timespec,
} from './devices/fs/filesystem'
export { MemoryFs } from './devices/fs/memory-fs'
export type { MemoryFsOptions } from './devices/fs/memory-fs'
export { FUSE_OP, S_IF } from './devices/fs/fuse'

export type { BlockBackend, BlockBackendCapabilities, BlockIo } from './backends/backend'
export { MemoryBackend } from './backends/memory'
export { NullBackend } from './backends/null'
export { FileBackend } from './backends/file'
export type { FileBackendOptions } from './backends/file'
export { NbdBackend, NBD_FLAGS, parseNbdUri } from './backends/nbd'
export type { NbdAddress, NbdBackendEvents, NbdBackendOptions, NbdExportInfo } from './backends/nbd'
export { defineBackend, loadBackendPlugin, defineFileSystem, loadFsPlugin } from './plugin'
export type { BackendFactory, BackendPluginOptions, FsFactory, FsPluginOptions } from './plugin'

export { InProcessTransport } from './transport/in-process'
export { vhostUser } from './transport/native'
export type { VhostUserOptions } from './transport/native'
export type { InProcessResult } from './transport/in-process'
export type {
  Transport,
  RequestSource,
  DeviceCounters,
  DeviceEvent,
  DeviceInit,
  PortCounters,
  TapCounters,
} from './transport/source'
export { RequestBatch, BatchArrays, Completions, HEAD_BYTES } from './transport/batch'
export type { AttachDriver } from './transport/attach'

export { logs, setLogLevel } from './log'
export type { LogRecord, LogLevel } from './log'
