#!/usr/bin/env node
import { main } from '../dist/src/cli/torusblk.js';

main(process.argv.slice(2));
