#!/usr/bin/env node
import { main } from '../dist/src/cli/torusd.js';

main(process.argv.slice(2));
