#!/usr/bin/env node
// The container image's entrypoint (src/cli/container.ts): environment variables to flags, then
// torusd, torusctl or torusblk in this process.
import { main } from '../dist/src/cli/container.js';

void main(process.argv.slice(2));
