import { Option, type Command } from 'commander';
import { pino, type Logger } from 'pino';
import { PinoPretty } from 'pino-pretty';

// Logs of the long-running commands (torusd, torusblk's servers), always on stderr. People at a
// terminal get one readable line per event; anything else (a file, journald, a log shipper) gets
// JSON lines with ISO 8601 times, which every log pipeline parses without a format hint.

export const LOG_FORMATS = ['auto', 'human', 'json'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

export function addLogOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option('--log-level <level>', 'log level').choices(['debug', 'info', 'warn', 'error']).default('info'))
    .addOption(new Option('--log-format <format>', 'auto: human on a terminal, JSON otherwise').choices(LOG_FORMATS).default('auto'));
}

export function makeLogger(svc: string, opts: { logLevel?: string; logFormat?: string; debug?: boolean }, tty = process.stderr.isTTY === true): Logger {
  const level = opts.debug ? 'debug' : (opts.logLevel ?? 'info');
  const human = opts.logFormat === 'human' || ((opts.logFormat ?? 'auto') === 'auto' && tty);
  if (human) {
    // Synchronous, in this thread: a daemon's last words before exit must not be lost in a worker.
    const pretty = PinoPretty({ destination: 2, sync: true, colorize: tty, translateTime: 'SYS:yyyy-mm-dd HH:MM:ss.l', ignore: 'pid,hostname,svc' });
    return pino({ level, base: { svc } }, pretty);
  }
  return pino({ level, base: { svc }, timestamp: pino.stdTimeFunctions.isoTime }, pino.destination({ fd: 2, sync: true }));
}
